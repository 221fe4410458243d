"""Read a prepared directory (`src.data.prepare`): checked against the run, memory-mapped."""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError, run_overrides
from src.data.prepare import FORMAT_VERSION, MANIFEST, SPLITS, TOKEN_DTYPE
from src.diffusion.loss import IGNORE_INDEX
from src.model.tokenizer import tokenizer_fingerprint


def prepare_command(directory: str | Path) -> str:
    """The command that prepares `directory` for the current run."""
    overrides = run_overrides()
    args = (
        " ".join(o for o in overrides if not o.startswith("data.prepared=")) if overrides else None
    )
    return f"python -m src.prepare_data {args or '<the run overrides>'} out={directory}"


def check_prepared(
    directory: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    block_size: int,
    pad_to_block: bool,
) -> dict[str, Any]:
    """The manifest of `directory`, after checking it was prepared for this run and that its
    shards are whole; else one line that names the command preparing the right one."""
    directory = Path(directory)
    fix = f"prepare it with `{prepare_command(directory)}`"
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        what = "does not exist" if not directory.exists() else "holds no manifest.json"
        raise ConfigError(f"data.prepared={directory} {what}: {fix}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{manifest_file} is not valid JSON: {fix}") from None
    expected = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "block_size": block_size,
        "pad_to_block": pad_to_block,
    }
    differ = [
        f"{k} {manifest.get(k)} (run: {v})" for k, v in expected.items() if manifest.get(k) != v
    ]
    if differ:
        raise ConfigError(f"data.prepared={directory} was prepared with {', '.join(differ)}: {fix}")
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            size = shard["contexts"] * seq_len * np.dtype(TOKEN_DTYPE).itemsize
            for key in ("tokens", "labels"):
                path = directory / split / shard[key]
                if not path.is_file() or path.stat().st_size != size:
                    raise ConfigError(f"{path} is missing or truncated: {fix}")
    return manifest


class PreparedSplit(Dataset):
    """One split of a prepared directory: `{"input_ids", "labels"}` LongTensors `[seq_len]`,
    read from memory-mapped shards (nothing is loaded up front)."""

    def __init__(self, directory: str | Path, split: str, manifest: dict[str, Any]) -> None:
        seq_len = manifest["seq_len"]
        self.shards = [
            {
                key: np.memmap(
                    Path(directory) / split / shard[key],
                    dtype=TOKEN_DTYPE,
                    mode="r",
                    shape=(shard["contexts"], seq_len),
                )
                for key in ("tokens", "labels")
            }
            for shard in manifest["splits"][split]["shards"]
        ]
        sizes = [shard["contexts"] for shard in manifest["splits"][split]["shards"]]
        self.ends = list(np.cumsum(sizes))

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.ends else 0

    def _locate(self, index: int) -> tuple[dict[str, np.memmap], int]:
        k = bisect.bisect_right(self.ends, index)
        return self.shards[k], index - (int(self.ends[k - 1]) if k else 0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self._locate(index)
        return {
            "input_ids": torch.from_numpy(shard["tokens"][row].astype(np.int64)),
            "labels": torch.from_numpy(shard["labels"][row].astype(np.int64)),
        }

    def num_supervised(self, indices: Iterable[int]) -> int:
        """Supervised tokens (labels other than -100) of the contexts `indices`, labels only."""
        total = 0
        for index in indices:
            shard, row = self._locate(int(index))
            total += int(np.count_nonzero(shard["labels"][row] != IGNORE_INDEX))
        return total
