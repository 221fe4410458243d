"""Chat SFT data: render conversations with the chat template, label assistant tokens, pack.

SPEC section 2: labels cover the assistant content and its closing stop token only; with
`pad_to_block` every sample is padded at its end with mask-token ids up to a multiple of the
block size (so no block straddles two samples), then samples are packed into contexts of
`seq_len` tokens. Padding and context tails hold the mask id with label -100.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.data.jsonl import read_jsonl
from src.data.synthetic import generate_split
from src.diffusion.loss import IGNORE_INDEX
from src.model.tokenizer import mask_token_id_of

log = logging.getLogger(__name__)

SOURCE_KINDS = ("synthetic", "jsonl", "hub")
# Keys of a synthetic source giving the number of items per split.
_SYNTHETIC_SIZE_KEYS = {"train": "n_train", "validation": "n_val", "test": "n_test"}


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """ConfigError unless `tokenizer` can render chats and has a stop (eos) token."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "tokenizer has no chat_template; set tokenizer.chat_template to a ChatML template "
            "(e.g. src.data.tokenizer.CHAT_TEMPLATE) or use an instruct model's tokenizer"
        )
    if tokenizer.eos_token is None:
        raise ConfigError("tokenizer has no eos_token; set it to the stop token (e.g. <|im_end|>)")


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping]) -> list:
    """Character spans [start, end) of each assistant turn's content plus its stop token.

    Found by rendering: the prompt up to a turn with the generation header gives its start;
    the conversation up to and including the turn gives its end (the first stop token after
    the start). This works for any template that renders prefixes of a chat as prefixes.
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
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
        stop = upto.find(tokenizer.eos_token, len(prompt))
        end = len(upto) if stop < 0 else stop + len(tokenizer.eos_token)
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


def _is_empty_chat(messages: Sequence[Mapping[str, str]]) -> bool:
    """No assistant turn, or one with blank content: nothing worth supervising."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return not replies or any(not (r or "").strip() for r in replies)


def pack(
    samples: Sequence[tuple[list[int], list[int]]],
    seq_len: int,
    block_size: int,
    pad_to_block: bool,
    mask_token_id: int,
) -> tuple[dict[str, list[list[int]]], PackStats]:
    """Pack rendered samples in order into contexts of exactly `seq_len` tokens.

    A sample longer than `seq_len` is cut to `seq_len` (a block boundary, as seq_len is a
    multiple of block_size) and dropped when no supervised token survives the cut; an empty
    sample counts as dropped. A sample that does not fit in the current context starts the
    next one.
    """
    check_lengths(seq_len, block_size)
    stats = PackStats(samples=len(samples))
    contexts: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    ids: list[int] = []
    labels: list[int] = []

    def flush() -> None:
        fill = seq_len - len(ids)
        contexts["input_ids"].append(ids + [mask_token_id] * fill)
        contexts["labels"].append(labels + [IGNORE_INDEX] * fill)

    for sample_ids, sample_labels in samples:
        if not sample_ids:
            stats.dropped_empty += 1
            continue
        if len(sample_ids) > seq_len:
            stats.truncated += 1
            sample_ids, sample_labels = sample_ids[:seq_len], sample_labels[:seq_len]
        supervised = sum(label != IGNORE_INDEX for label in sample_labels)
        if supervised == 0:
            stats.dropped_unsupervised += 1
            continue
        if pad_to_block:
            fill = -len(sample_ids) % block_size
            sample_ids = sample_ids + [mask_token_id] * fill
            sample_labels = sample_labels + [IGNORE_INDEX] * fill
        if len(ids) + len(sample_ids) > seq_len:
            flush()
            ids, labels = [], []
        ids, labels = ids + sample_ids, labels + sample_labels
        stats.packed += 1
        stats.supervised_tokens += supervised
    if ids:
        flush()
    stats.contexts = len(contexts["input_ids"])
    return contexts, stats


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
    """Packed SFT contexts: a Dataset with `input_ids` and `labels`, each of length `seq_len`.

    `items` are chats (anything with a `messages` column). `mask_token_id` defaults to the
    tokenizer's MASK_TOKEN id.
    """
    check_lengths(seq_len, block_size)
    check_chat_tokenizer(tokenizer)
    if mask_token_id is None:
        mask_token_id = mask_token_id_of(tokenizer)
    chats = (
        items if isinstance(items, datasets.Dataset) else datasets.Dataset.from_list(list(items))
    )
    if "messages" not in chats.column_names:
        raise ValueError(f"chat data needs a 'messages' column; got {chats.column_names}")

    def render(example: dict) -> dict:
        if _is_empty_chat(example["messages"]):
            return {"input_ids": [], "labels": []}
        input_ids, labels = render_chat(tokenizer, example["messages"])
        return {"input_ids": input_ids, "labels": labels}

    rendered = chats.map(render, remove_columns=chats.column_names, desc="render chats")
    contexts, stats = pack(
        list(zip(rendered["input_ids"], rendered["labels"], strict=True)),
        seq_len,
        block_size,
        pad_to_block,
        mask_token_id,
    )
    log.info(
        "packed %d/%d samples into %d contexts of %d tokens (%d supervised tokens); "
        "dropped %d empty + %d unsupervised, truncated %d",
        stats.packed,
        stats.samples,
        stats.contexts,
        seq_len,
        stats.supervised_tokens,
        stats.dropped_empty,
        stats.dropped_unsupervised,
        stats.truncated,
    )
    if stats.contexts == 0:
        raise ValueError("no usable samples: every chat was empty or lost its assistant turn")
    return datasets.Dataset.from_dict(contexts)


def source_items(source: Mapping[str, Any], split: str) -> datasets.Dataset | list[dict]:
    """The chats of one split of a data source.

    Sources (`kind` key):
    - ``synthetic``: ``n_train`` / ``n_val`` / ``n_test`` items and ``seed`` (default 0);
    - ``jsonl``: a path per split under the split name (``train``, ``validation``, ``test``);
    - ``hub``: ``name`` (and optional ``config``) for `datasets.load_dataset`, with a
      ``messages`` column; the split name is ``{split}_split`` when given, else `split`.
    """
    kind = source.get("kind")
    if kind == "synthetic":
        size_key = _SYNTHETIC_SIZE_KEYS[split]
        if size_key not in source:
            raise ValueError(f"synthetic source needs {size_key!r} for the {split} split")
        return generate_split(split, int(source[size_key]), seed=int(source.get("seed", 0)))
    if kind == "jsonl":
        if not source.get(split):
            raise ValueError(f"jsonl source has no path for the {split!r} split")
        return read_jsonl(source[split], key=f"data.source.{split}")
    if kind == "hub":
        if not source.get("name"):
            raise ValueError("hub source needs 'name' (a datasets hub id)")
        hub_split = source.get(f"{split}_split", split)
        return datasets.load_dataset(source["name"], source.get("config"), split=hub_split)
    raise ValueError(f"unknown data source kind {kind!r}; use one of {SOURCE_KINDS}")
