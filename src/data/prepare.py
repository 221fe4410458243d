"""Prepare chat data once: render, label and pack (`src.data.sft`), write memory-mapped shards.

    prepare(tokenizer, source, seq_len=2048, block_size=32, pad_to_block=True, out="data/x",
            num_proc=32, max_tokens=1_300_000_000)

A prepared directory holds, per split (`train/`, `validation/`), int32 token and label shards
(`tokens-00000.bin`, `labels-00000.bin`, raw `[contexts, seq_len]` arrays) and one
`manifest.json`: the tokenizer's fingerprint, seq_len, block_size, pad_to_block, the source,
and per split the shards, contexts and supervised tokens. Chats stream through: rendering runs
in `num_proc` worker processes a window at a time, packing holds one context, shards are
written as they fill, so memory does not grow with the corpus. Everything is written into a
temporary sibling directory that is renamed into place after the manifest
(`src.config.files.atomic_folder`): an interrupted preparation never leaves a directory that
training accepts, and a full disk is one line (checked up front under `max_tokens`).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.config.files import atomic_folder
from src.data.sft import Packer, check_chat_tokenizer, check_lengths, log_pack_stats, render_sample
from src.data.sources import iter_chats
from src.model.tokenizer import mask_token_id_of, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
TOKEN_DTYPE = np.int32
# Contexts per shard file: 2^28 tokens (1 GiB of int32) at most.
SHARD_TOKENS = 2**28
_RENDER_CHUNK = 256  # chats per task handed to a worker
_FLUSH_ROWS = 256  # contexts buffered before a write


def prepare(
    tokenizer: PreTrainedTokenizerBase,
    source: Mapping[str, Any],
    *,
    seq_len: int,
    block_size: int,
    pad_to_block: bool,
    out: str | Path,
    num_proc: int = 1,
    max_tokens: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the prepared directory `out` for `source` (train and validation splits); returns
    its manifest. `max_tokens` caps the train split's packed tokens."""
    check_lengths(seq_len, block_size)
    check_chat_tokenizer(tokenizer)
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc} must be >= 1")
    if max_tokens is not None and max_tokens < seq_len:
        raise ConfigError(
            f"max_tokens={max_tokens} is less than one context (data.seq_len={seq_len}): "
            f"raise it to at least {seq_len}, or null for the whole source"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass overwrite=true, or another out=<dir>")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_name": tokenizer.name_or_path,
        "seq_len": seq_len,
        "block_size": block_size,
        "pad_to_block": pad_to_block,
        "mask_token_id": mask_token_id_of(tokenizer),
        "source": dict(source),
        "max_tokens": max_tokens,
        "splits": {},
    }
    # The train split's size is known up front only under a token budget (int32 tokens and
    # labels); otherwise a full disk is found while writing, and said in one line as well.
    needed = 2 * TOKEN_DTYPE().itemsize * max_tokens if max_tokens is not None else None
    # A killed process leaves its temporary sibling, never a half-written `out`; an existing
    # `out` (overwrite=true) stays until the new one is complete.
    what = f"the prepared data (max_tokens={max_tokens})" if needed else "the prepared data"
    with atomic_folder(out, what=what, needed=needed) as tmp:
        for split in SPLITS:
            budget = max_tokens if split == "train" else None
            manifest["splits"][split] = _prepare_split(
                tokenizer, iter_chats(source, split), tmp / split, manifest, num_proc, budget, split
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _prepare_split(
    tokenizer: PreTrainedTokenizerBase,
    chats: Iterator[dict],
    directory: Path,
    manifest: Mapping[str, Any],
    num_proc: int,
    max_tokens: int | None,
    split: str,
) -> dict[str, Any]:
    seq_len = manifest["seq_len"]
    packer = Packer(
        seq_len, manifest["block_size"], manifest["pad_to_block"], manifest["mask_token_id"]
    )
    writer = _ShardWriter(directory, seq_len)
    started = time.perf_counter()
    limit = None if max_tokens is None else max_tokens // seq_len
    for ids, labels in itertools.islice(
        packer.contexts(_rendered(tokenizer, chats, num_proc)), limit
    ):
        writer.write(ids, labels)
    shards = writer.close()
    log_pack_stats(packer.stats, seq_len, f" ({split})")
    if not shards:
        raise ConfigError(
            f"the {split} split of data.source has no usable chats (none left after filtering, "
            "or none with an assistant answer): check data.source"
        )
    return {
        "shards": shards,
        "contexts": sum(s["contexts"] for s in shards),
        "tokens": sum(s["contexts"] for s in shards) * seq_len,
        "supervised_tokens": packer.stats.supervised_tokens,
        "samples": packer.stats.samples,
        "dropped": packer.stats.dropped_empty + packer.stats.dropped_unsupervised,
        "truncated": packer.stats.truncated,
        "seconds": time.perf_counter() - started,
    }


class _ShardWriter:
    """Appends contexts to raw int32 token/label files, a new pair every SHARD_TOKENS tokens."""

    def __init__(self, directory: Path, seq_len: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.seq_len = directory, seq_len
        self.per_shard = max(1, SHARD_TOKENS // seq_len)
        self.shards: list[dict[str, Any]] = []
        self.rows: list[tuple[list[int], list[int]]] = []
        self.files: tuple[Any, Any] | None = None

    def write(self, ids: list[int], labels: list[int]) -> None:
        if self.files is None or self.shards[-1]["contexts"] == self.per_shard:
            self._open()
        self.rows.append((ids, labels))
        self.shards[-1]["contexts"] += 1
        if len(self.rows) == _FLUSH_ROWS or self.shards[-1]["contexts"] == self.per_shard:
            self._flush()

    def _open(self) -> None:
        self._flush()
        self._close_files()
        k = len(self.shards)
        shard = {"tokens": f"tokens-{k:05d}.bin", "labels": f"labels-{k:05d}.bin", "contexts": 0}
        self.shards.append(shard)
        self.files = (
            open(self.directory / shard["tokens"], "wb"),  # noqa: SIM115 (closed in close())
            open(self.directory / shard["labels"], "wb"),  # noqa: SIM115
        )

    def _flush(self) -> None:
        if not self.rows:
            return
        tokens, labels = self.files
        tokens.write(np.asarray([r[0] for r in self.rows], dtype=TOKEN_DTYPE).tobytes())
        labels.write(np.asarray([r[1] for r in self.rows], dtype=TOKEN_DTYPE).tobytes())
        self.rows = []

    def _close_files(self) -> None:
        if self.files is not None:
            for f in self.files:
                f.close()
            self.files = None

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self._close_files()
        return self.shards


def _rendered(
    tokenizer: PreTrainedTokenizerBase, chats: Iterable[dict], num_proc: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Rendered samples in chat order; with `num_proc` > 1, rendered by worker processes with
    at most `2 * num_proc` chunks of chats in flight (`Pool.imap` would read the whole source
    ahead), so the workers render while this process packs and writes."""
    if num_proc == 1:
        for chat in chats:
            yield render_sample(tokenizer, chat["messages"])
        return
    context = multiprocessing.get_context("spawn")  # no forked torch / tokenizer threads
    chunks = _batched(chats, _RENDER_CHUNK)
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = collections.deque(
            pool.apply_async(_render_chunk, (chunk,))
            for chunk in itertools.islice(chunks, 2 * num_proc)
        )
        while pending:
            samples = pending.popleft().get()
            if (chunk := next(chunks, None)) is not None:
                pending.append(pool.apply_async(_render_chunk, (chunk,)))
            yield from samples
        pool.close()  # let the workers exit by themselves: terminating them can abort them
        pool.join()


_worker_tokenizer: PreTrainedTokenizerBase | None = None


def _init_worker(tokenizer: PreTrainedTokenizerBase) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _render_chunk(chats: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [render_sample(_worker_tokenizer, chat["messages"]) for chat in chats]


def _batched(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
