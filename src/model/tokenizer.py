"""The run's tokenizer, with the diffusion mask token (SPEC section 2: one extra vocabulary
entry; its id is always read from the tokenizer, never hard-coded)."""

from __future__ import annotations

import hashlib
import json
import os

from omegaconf import DictConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from src.config import instantiate

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


def load_tokenizer(pretrained: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local folder, with the mask token added when missing."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(pretrained), **kwargs)
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
