"""LightningDataModule over packed chat SFT contexts, prepared once (`src.data.prepare`)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.data.prepare import MANIFEST, prepare
from src.data.prepared import PreparedSplit, check_prepared, prepare_command
from src.data.sft import check_chat_tokenizer, check_lengths
from src.data.sources import source_items
from src.model.tokenizer import tokenizer_fingerprint


class ResumableShuffleSampler(Sampler[tuple[int, int]]):
    """This rank's share of a (seed, epoch) permutation, in whole batches and whole optimizer
    steps, from `skip_batches` on; each context index comes with `window_supervised`, the
    number of supervised tokens of its optimizer step (all ranks, all micro-batches).

    The order depends only on (seed, epoch, rank), and a resumed run skips the batches the
    interrupted run already consumed in its epoch, so it sees exactly the batches the
    uninterrupted run saw. Ranks take strided shares of the permutation themselves (the trainer
    runs with `use_distributed_sampler=False`). An optimizer step takes `accumulate` batches
    per rank: the contexts `window * k .. window * (k + 1)` of the permutation, `window` =
    batch_size x world_size x accumulate. An epoch holds whole steps only, so no step straddles
    two epochs (DeepSpeed counts its accumulation across epochs, Lightning per epoch) and
    every step's token count is known before its first micro-batch: the loss is normalised by
    it (SPEC section 2: the number of supervised tokens in the batch). `num_supervised` counts
    the supervised tokens of a list of contexts; each rank counts every rank's contexts of a
    step itself (a read of their labels), so no collective is needed. `__len__` is the whole
    epoch, as Lightning counts a resumed epoch's batches from where it stopped.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
        num_supervised: Callable[[list[int]], int] | None = None,
    ) -> None:
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        self.window = batch_size * world_size * accumulate  # contexts per optimizer step
        self.num_batches = (size // self.window) * accumulate  # per rank, whole steps only
        if self.num_batches == 0:
            raise ValueError(
                f"{size} training contexts are fewer than one optimizer step's "
                f"({batch_size} per batch x {world_size} ranks x {accumulate} accumulated): "
                "lower data.batch_size or trainer.accumulate_grad_batches, or add data"
            )
        self.num_supervised = num_supervised or len
        self.epoch, self.skip_batches = 0, 0

    def resume_at(self, consumed_batches: int) -> None:
        self.epoch, self.skip_batches = divmod(consumed_batches, self.num_batches)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        mine = order[
            self.rank : self.num_batches * self.batch_size * self.world_size : self.world_size
        ]
        step, supervised = -1, 0
        for batch in range(self.skip_batches, self.num_batches):
            if batch // self.accumulate != step:
                step = batch // self.accumulate
                supervised = self.num_supervised(
                    order[step * self.window : (step + 1) * self.window]
                )
            for index in mine[batch * self.batch_size : (batch + 1) * self.batch_size]:
                yield index, supervised

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


class TrainContexts(Dataset):
    """The train split indexed by the sampler's (context, step's supervised tokens) pairs:
    batches `{input_ids, labels, window_supervised}` (`window_supervised` `[b]`, one value)."""

    def __init__(self, split: PreparedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, window_supervised = item
        return {**self.split[index], "window_supervised": torch.tensor(window_supervised)}


class ChatDataModule(L.LightningDataModule):
    """Train/validation batches ``{input_ids, labels}``, LongTensors ``[b, seq_len]``, read from a
    prepared directory (`src.data.prepare`).

    `prepared`: a directory `python -m src.prepare_data` wrote (checked against the run when the
    module is built, before any model loads). Without one, the small sources (synthetic, jsonl;
    see `src.data.sources`) are prepared on the fly into `cache_dir/<hash of the settings>` by
    one process (Lightning's `prepare_data` runs on global rank 0 only), e.g. `source`
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
        prepared: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_lengths(seq_len, block_size)
        check_chat_tokenizer(tokenizer)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.prepare_data_per_node = False  # one process prepares, on a filesystem all share
        self.tokenizer = tokenizer
        self.source = (
            OmegaConf.to_container(source) if isinstance(source, DictConfig) else dict(source)
        )
        self.seq_len, self.block_size, self.pad_to_block = seq_len, block_size, pad_to_block
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.lengths = {"seq_len": seq_len, "block_size": block_size, "pad_to_block": pad_to_block}
        if prepared is not None:
            check_prepared(prepared, tokenizer=tokenizer, **self.lengths)
        elif self.source.get("kind") == "hub":
            raise ConfigError(
                "data.source is a hub dataset: prepare it once with "
                f"`{prepare_command('<dir>')}`, then train with data.prepared=<dir>"
            )
        self.prepared = prepared
        # Without a cache folder (tests, benches), a temporary one that goes with the module.
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="chat-data-")
        self._cache = cache_dir or self._tmp.name
        self.train_dataset: PreparedSplit | None = None
        self.val_dataset: PreparedSplit | None = None

    @property
    def directory(self) -> Path:
        """The prepared directory this module reads: `prepared`, or its on-the-fly cache."""
        if self.prepared is not None:
            return Path(self.prepared)
        key = json.dumps(
            [self.source, self.lengths, tokenizer_fingerprint(self.tokenizer)], sort_keys=True
        )
        return Path(self._cache) / hashlib.sha256(key.encode()).hexdigest()[:16]

    def prepare_data(self) -> None:
        if self.prepared is None and not (self.directory / MANIFEST).exists():
            prepare(self.tokenizer, self.source, out=self.directory, overwrite=True, **self.lengths)

    def setup(self, stage: str | None = None) -> None:
        # Once: Lightning calls setup for fit, validate and test alike. Outside a Trainer (no
        # process group) nobody else prepares the data.
        if self.train_dataset is not None:
            return
        if not torch.distributed.is_initialized():
            self.prepare_data()
        manifest = check_prepared(self.directory, tokenizer=self.tokenizer, **self.lengths)
        self.train_dataset = PreparedSplit(self.directory, "train", manifest)
        self.val_dataset = PreparedSplit(self.directory, "validation", manifest)

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
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            num_supervised=self.train_dataset.num_supervised,
        )
        if trainer is not None:
            # Checkpoints are taken at optimizer-step boundaries (PreemptionCheckpoint too).
            sampler.resume_at(trainer.global_step * trainer.accumulate_grad_batches)
        return DataLoader(
            TrainContexts(self.train_dataset),
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
