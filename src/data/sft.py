"""Chat SFT data: render conversations with the chat template, label assistant tokens, pack.

SPEC section 2: labels cover the assistant content and its closing stop token only; with
`pad_to_block` every sample is padded at its end with mask-token ids up to a multiple of the
block size (so no block straddles two samples), then samples are packed into contexts of
`seq_len` tokens. Padding and context tails hold the mask id with label -100.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.diffusion.loss import IGNORE_INDEX
from src.model.tokenizer import mask_token_id_of, stop_token_of

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """ConfigError unless `tokenizer` can render chats whose assistant turns end with a stop
    token (`stop_token_of`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "tokenizer has no chat_template; set tokenizer.chat_template to a ChatML template "
            "(e.g. src.data.tokenizer.CHAT_TEMPLATE) or use an instruct model's tokenizer"
        )
    stop_token_of(tokenizer)


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping]) -> list:
    """Character spans [start, end) of each assistant turn's content plus its stop token.

    Found by rendering: the prompt up to a turn with the generation header gives its start;
    the conversation up to and including the turn gives its end (the first stop token after
    the start). This works for any template that renders prefixes of a chat as prefixes.
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    stop_token, _ = stop_token_of(tokenizer)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            list(messages[:k]), tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(list(messages[: k + 1]), tokenize=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(
                "the chat template does not render a conversation's prefixes as prefixes; "
                "use a ChatML-style template"
            )
        stop = upto.find(stop_token, len(prompt))
        end = len(upto) if stop < 0 else stop + len(stop_token)
        spans.append((len(prompt), end))
    return spans


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-template rendering and labels on assistant tokens only.

    A token is supervised when its characters overlap an assistant turn's content or the
    stop token closing it; everything else (system, user, the assistant header) is -100.
    The rendering ends at the last supervised token (the last reply's stop token).
    """
    check_chat_tokenizer(tokenizer)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = _assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [
        token_id if any(s < end and e > start for start, end in spans) else IGNORE_INDEX
        for token_id, (s, e) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    # What a template adds after the last stop token (ChatML: a newline) is never masked, so
    # in the block-diffusion objective it would sit visible in the answer's last block and
    # tell the model where the answer ends; at inference nothing follows the stop token.
    end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
    return input_ids[:end], labels[:end]


@dataclass
class PackStats:
    """What happened to the samples while packing (logged by `build_sft_dataset`)."""

    samples: int = 0
    packed: int = 0
    dropped_empty: int = 0
    dropped_unsupervised: int = 0
    truncated: int = 0
    contexts: int = 0
    supervised_tokens: int = 0


def is_empty_chat(messages: Sequence[Mapping[str, str]]) -> bool:
    """No assistant turn, or one with blank content: nothing worth supervising."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return not replies or any(not (r or "").strip() for r in replies)


def render_sample(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """`render_chat`, or an empty sample (dropped when packed) for a chat with no answer."""
    return ([], []) if is_empty_chat(messages) else render_chat(tokenizer, messages)


class Packer:
    """Packs rendered samples, in order, into contexts of exactly `seq_len` tokens.

    A sample longer than `seq_len` is cut to `seq_len` (a block boundary, as seq_len is a
    multiple of block_size) and dropped when no supervised token survives the cut; an empty
    sample counts as dropped. With `pad_to_block` a sample is padded with mask ids to a block
    multiple. A sample that does not fit in the current context starts the next one; a
    context's tail holds mask ids with label -100. Holds one context at a time.
    """

    def __init__(
        self, seq_len: int, block_size: int, pad_to_block: bool, mask_token_id: int
    ) -> None:
        check_lengths(seq_len, block_size)
        self.seq_len, self.block_size = seq_len, block_size
        self.pad_to_block, self.mask_token_id = pad_to_block, mask_token_id
        self.stats = PackStats()

    def contexts(
        self, samples: Iterable[tuple[list[int], list[int]]]
    ) -> Iterator[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each context, as soon as it is full."""
        seq_len, stats = self.seq_len, self.stats
        ids: list[int] = []
        labels: list[int] = []
        for sample_ids, sample_labels in samples:
            stats.samples += 1
            if not len(sample_ids):
                stats.dropped_empty += 1
                continue
            if len(sample_ids) > seq_len:
                stats.truncated += 1
                sample_ids, sample_labels = sample_ids[:seq_len], sample_labels[:seq_len]
            supervised = sum(label != IGNORE_INDEX for label in sample_labels)
            if supervised == 0:
                stats.dropped_unsupervised += 1
                continue
            if self.pad_to_block:
                fill = -len(sample_ids) % self.block_size
                sample_ids = list(sample_ids) + [self.mask_token_id] * fill
                sample_labels = list(sample_labels) + [IGNORE_INDEX] * fill
            if len(ids) + len(sample_ids) > seq_len:
                yield self._close(ids, labels)
                ids, labels = [], []
            ids, labels = ids + list(sample_ids), labels + list(sample_labels)
            stats.packed += 1
            stats.supervised_tokens += supervised
        if ids:
            yield self._close(ids, labels)

    def _close(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        self.stats.contexts += 1
        fill = self.seq_len - len(ids)
        return ids + [self.mask_token_id] * fill, labels + [IGNORE_INDEX] * fill


def pack(
    samples: Sequence[tuple[list[int], list[int]]],
    seq_len: int,
    block_size: int,
    pad_to_block: bool,
    mask_token_id: int,
) -> tuple[dict[str, list[list[int]]], PackStats]:
    """All contexts of `Packer` at once (small data), with what happened to the samples."""
    packer = Packer(seq_len, block_size, pad_to_block, mask_token_id)
    contexts: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for ids, labels in packer.contexts(samples):
        contexts["input_ids"].append(ids)
        contexts["labels"].append(labels)
    return contexts, packer.stats


def log_pack_stats(stats: PackStats, seq_len: int, what: str = "") -> None:
    log.info(
        "packed %d/%d samples%s into %d contexts of %d tokens (%d supervised tokens); "
        "dropped %d empty + %d unsupervised, truncated %d",
        stats.packed,
        stats.samples,
        what,
        stats.contexts,
        seq_len,
        stats.supervised_tokens,
        stats.dropped_empty,
        stats.dropped_unsupervised,
        stats.truncated,
    )


def check_lengths(seq_len: int, block_size: int) -> None:
    """ConfigError unless the context length is a positive multiple of the block size
    (SPEC section 2: L a multiple of B, so packed contexts hold whole blocks)."""
    if block_size < 1:
        raise ConfigError(f"diffusion.block_size={block_size} must be >= 1")
    if seq_len < 1 or seq_len % block_size:
        raise ConfigError(
            f"data.seq_len={seq_len} is not a multiple of diffusion.block_size={block_size}: "
            f"use e.g. data.seq_len={max(1, seq_len // block_size) * block_size}"
        )


def build_sft_dataset(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]] | datasets.Dataset,
    seq_len: int,
    block_size: int,
    pad_to_block: bool = True,
    mask_token_id: int | None = None,
) -> datasets.Dataset:
    """Packed SFT contexts in memory: a Dataset with `input_ids` and `labels`, each of length
    `seq_len` (small data; `src.data.prepare` writes large data to disk the same way).

    `items` are chats (anything with a `messages` column). `mask_token_id` defaults to the
    tokenizer's MASK_TOKEN id.
    """
    import datasets

    check_lengths(seq_len, block_size)
    check_chat_tokenizer(tokenizer)
    if mask_token_id is None:
        mask_token_id = mask_token_id_of(tokenizer)
    if isinstance(items, datasets.Dataset) and "messages" not in items.column_names:
        raise ValueError(f"chat data needs a 'messages' column; got {items.column_names}")
    samples = (render_sample(tokenizer, item["messages"]) for item in items)
    contexts, stats = pack(list(samples), seq_len, block_size, pad_to_block, mask_token_id)
    log_pack_stats(stats, seq_len)
    if stats.contexts == 0:
        raise ValueError("no usable samples: every chat was empty or lost its assistant turn")
    return datasets.Dataset.from_dict(contexts)
