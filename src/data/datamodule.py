"""LightningDataModule over packed chat SFT contexts (see `src.data.sft`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from src.data.sft import (
    build_sft_dataset,
    check_chat_tokenizer,
    check_lengths,
    mask_token_id_of,
    source_items,
)


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order.

    Lightning calls `set_epoch` on samplers that have it at the start of every epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class ChatDataModule(L.LightningDataModule):
    """Train/validation batches ``{input_ids, labels}``, LongTensors ``[b, seq_len]``.

    `source` picks the chats (see `src.data.sft.source_items`), e.g.
    ``{"kind": "synthetic", "n_train": 20000, "n_val": 200, "n_test": 100, "seed": 0}``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: Mapping[str, Any],
        seq_len: int,
        block_size: int,
        pad_to_block: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_lengths(seq_len, block_size)
        check_chat_tokenizer(tokenizer)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokenizer = tokenizer
        self.source = dict(source)
        self.seq_len, self.block_size, self.pad_to_block = seq_len, block_size, pad_to_block
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.mask_token_id = mask_token_id_of(tokenizer)
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None

    def _build(self, split: str) -> datasets.Dataset:
        dataset = build_sft_dataset(
            self.tokenizer,
            source_items(self.source, split),
            self.seq_len,
            self.block_size,
            self.pad_to_block,
            self.mask_token_id,
        )
        return dataset.with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        # Built once: Lightning calls setup for fit, validate and test alike.
        if self.train_dataset is None:
            self.train_dataset = self._build("train")
            self.val_dataset = self._build("validation")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.train_dataset), self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers
        )

    def test_items(self) -> list[dict]:
        """Raw test chats for decoding evaluation, each with an ``answer`` (the reference:
        its own field, else the last assistant turn)."""
        items = source_items(self.source, "test")
        return [
            {**item, "answer": item.get("answer") or _last_assistant(item["messages"])}
            for item in items
        ]


def _last_assistant(messages: list[dict]) -> str:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if not replies:
        raise ValueError("a test chat has no assistant turn to use as the reference answer")
    return replies[-1]
