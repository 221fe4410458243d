"""A small ChatML byte-level BPE tokenizer trained on the synthetic corpus.

Digits are always single tokens (numbers are split into digits before BPE), which makes
arithmetic far easier for a tiny model. Special tokens follow Qwen2.5: ``<|endoftext|>``
(padding), ``<|im_start|>``, ``<|im_end|>`` (eos / stop token) and the diffusion mask token.

    from src.data.tokenizer import synthetic_tokenizer
    tok = synthetic_tokenizer("artifacts/tokenizer")  # trains once, then loads from disk
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from src.data.synthetic import generate_split
from src.model.tokenizer import MASK_TOKEN

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, MASK_TOKEN)

# Qwen2.5's ChatML layout, without its default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_VOCAB_SIZE = 384
# Items drawn to train the BPE merges; the corpus is repetitive, so a few thousand suffice.
_CORPUS_ITEMS = 4000


def _corpus(seed: int) -> list[str]:
    items = generate_split("train", _CORPUS_ITEMS, seed=seed)
    return [m["content"] for item in items for m in item["messages"]]


def train_tokenizer(
    corpus: Iterable[str] | int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    save_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer on `corpus` texts (or on synthetic train items of seed `corpus`).

    The vocabulary is the 256 byte symbols, the special tokens and merges up to `vocab_size`.
    Training is deterministic for a given corpus. With `save_dir` the result is saved there.
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    texts = _corpus(corpus) if isinstance(corpus, int) else list(corpus)
    if not texts:
        raise ValueError("corpus is empty; pass texts or a seed for the synthetic corpus")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, MASK_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def synthetic_tokenizer(
    cache_dir: str | Path, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """The synthetic-corpus tokenizer, loaded from `cache_dir/seed{seed}-v{vocab_size}-{corpus}` or
    trained and saved there on first use. `corpus` hashes the training texts, so a changed corpus
    never reuses a stale tokenizer."""
    corpus = hashlib.sha256("\n".join(_corpus(seed)).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"seed{seed}-v{vocab_size}-{corpus}"
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    log.info("training the synthetic tokenizer into %s", path)
    return train_tokenizer(seed, vocab_size=vocab_size, save_dir=path)
