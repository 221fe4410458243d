"""LightningDataModule over packed chat SFT contexts (see `src.data.sft`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from src.data.sft import build_sft_dataset, check_chat_tokenizer, check_lengths, source_items
from src.model.tokenizer import mask_token_id_of


class ResumableShuffleSampler(Sampler[int]):
    """This rank's share of a (seed, epoch) permutation, in whole batches, from `skip_batches` on.

    The order depends only on (seed, epoch, rank), and a resumed run skips the batches the
    interrupted run already consumed in its epoch, so it sees exactly the batches the
    uninterrupted run saw. Ranks take strided shares of the permutation themselves (the trainer
    runs with `use_distributed_sampler=False`). `__len__` is the whole epoch, as Lightning
    counts a resumed epoch's batches from where it stopped.
    """

    def __init__(
        self, size: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_batches = size // (batch_size * world_size)  # per rank, whole batches only
        if self.num_batches == 0:
            raise ValueError(
                f"{size} training contexts are fewer than one batch per rank "
                f"({batch_size} x {world_size}): lower data.batch_size or add data"
            )
        self.epoch, self.skip_batches = 0, 0

    def resume_at(self, consumed_batches: int) -> None:
        self.epoch, self.skip_batches = divmod(consumed_batches, self.num_batches)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        used = self.num_batches * self.batch_size * self.world_size
        mine = order[self.rank : used : self.world_size]
        return iter(mine[self.skip_batches * self.batch_size :].tolist())

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


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
        # Lightning asks for the loader after restoring a checkpoint: global_step is the
        # resumed one, so the sampler can skip what was already trained on.
        trainer = self.trainer
        sampler = ResumableShuffleSampler(
            len(self.train_dataset),
            self.seed,
            self.batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        if trainer is not None:
            sampler.resume_at(trainer.global_step * trainer.accumulate_grad_batches)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
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
