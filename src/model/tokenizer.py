"""The run's tokenizer, with the diffusion mask token (SPEC section 2: one extra vocabulary
entry; its id is always read from the tokenizer, never hard-coded), and its stop token: the
token that ends an assistant turn in the chat template (SPEC: `<|im_end|>` for Qwen2.5)."""

from __future__ import annotations

import hashlib
import json
import os
import weakref

from omegaconf import DictConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from src.config import ConfigError, instantiate

MASK_TOKEN = "|<MASK>|"


def ensure_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token: str = MASK_TOKEN) -> int:
    """Add the mask token as a special token when the vocabulary lacks it; return its id."""
    if mask_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]})
    return tokenizer.convert_tokens_to_ids(mask_token)


def mask_token_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of MASK_TOKEN; ValueError when the tokenizer does not have it as a token."""
    token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer lacks {MASK_TOKEN!r}; add it as a special token first")
    return token_id


# Assistant content no template rewrites: where it ends in the rendering, the turn's end begins.
_SENTINEL = "Zq7 sentinel reply"
# Per tokenizer: (chat template, stop token). Data preparation asks once per sample.
_STOP_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_token_of(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int]:
    """The token (text, id) that ends an assistant turn in the chat template: what training
    supervises as the end of an answer and where decoding stops.

    Not `eos_token`: a base checkpoint's eos (Qwen2.5: `<|endoftext|>`) is not what closes an
    assistant turn (`<|im_end|>`). Found by rendering a reply and reading the first token after
    it; ConfigError (one line) when the tokenizer has no template, or the template closes a
    turn with no single special token.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(
            "the tokenizer has no chat_template, so no token ends an assistant turn: use an "
            "instruct model's tokenizer or set a ChatML template (src.data.tokenizer.CHAT_TEMPLATE)"
        )
    cached = _STOP_TOKENS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    end = text.rfind(_SENTINEL)
    tail = text[end + len(_SENTINEL) :].lstrip() if end >= 0 else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    if not ids or ids[0] not in special:
        raise ConfigError(
            f"the chat template closes an assistant turn with {tail[:20]!r}, not a special "
            "token, so decoding could not stop there: use a template whose turns end with one "
            "(ChatML: <|im_end|>)"
        )
    stop = tokenizer.convert_ids_to_tokens(ids[0]), ids[0]
    _STOP_TOKENS[tokenizer] = template, stop
    return stop


def load_tokenizer(pretrained: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local folder, with the mask token added when missing."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    # trust_remote_code=False: AutoTokenizer reads the model config first, and a released
    # Fast-dLLM v2 one (auto_map) would otherwise ask on stdin to run its configuration.py.
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.expanduser(pretrained), trust_remote_code=False, **kwargs
    )
    ensure_mask_token(tokenizer)
    return tokenizer


def build_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer (with the mask token): `model.tokenizer` when the config has one
    (scratch models train theirs), else the pretrained model's."""
    if model_cfg.get("tokenizer") is not None:
        tokenizer = instantiate(model_cfg.tokenizer)
        ensure_mask_token(tokenizer)
        return tokenizer
    return load_tokenizer(model_cfg.pretrained, gguf_file=model_cfg.get("gguf_file"))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, added tokens, the
    chat template and the stop token."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    for part in (vocab, str(tokenizer.chat_template), str(tokenizer.eos_token)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]
