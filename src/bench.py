"""Benchmarks: scripts that print measured numbers (never timed tests).

    python -m src.bench train                       # embedded default (experiment=tiny)
    python -m src.bench train experiment=smollm2 data.batch_size=2 bench.steps=3
    python -m src.bench decode ckpt=artifacts/tiny ar_ckpt=artifacts/tiny_ar_ft
    python -m src.bench decode ckpt=<export> ar_ckpt=<export> limit=20 thresholds=[0.9] \\
        sub_block_cache=[false] batch_sizes=[1] decode.sub_block_size=4 out=b.json

`train` (conf/bench_train.yaml: the training config plus `bench.*`): a training step of each
objective on one batch, timed side by side (`src.training.step_bench`). `decode`
(conf/bench_decode.yaml): AR decoding vs cached parallel decoding of the same prompts, every
variant interleaved (`src.evaluation.decode_bench`); the table is also written as JSON to `out`.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from src.config import ConfigError
from src.evaluation.decode_bench import bench_decode, print_decode_table
from src.training.step_bench import bench_train, print_train_table

USAGE = (
    "usage: python -m src.bench train [hydra overrides] [bench.steps=N]\n"
    "       python -m src.bench decode ckpt=<export> ar_ckpt=<AR export> [overrides]"
)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_train")
def train(cfg: DictConfig) -> None:
    try:
        rows = bench_train(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    print_train_table(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_decode")
def decode(cfg: DictConfig) -> None:
    try:
        report = bench_decode(cfg)
    except ValueError as err:  # ConfigError included: one line, before any decoding
        raise SystemExit(f"error: {err}") from None
    print_decode_table(report)
    with open(cfg.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {cfg.out}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "decode"):
        raise SystemExit(USAGE)
    command = sys.argv.pop(1)  # Hydra reads the overrides that follow it
    {"train": train, "decode": decode}[command]()


if __name__ == "__main__":
    main()
