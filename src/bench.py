"""Benchmarks: scripts that print measured numbers (never timed tests).

    python -m src.bench train                       # embedded default (experiment=tiny)
    python -m src.bench train experiment=smollm2 data.batch_size=2 bench.steps=3
    python -m src.bench decode ckpt=artifacts/tiny ar_ckpt=artifacts/tiny_ar_ft
    python -m src.bench decode ckpt=<export> ar_ckpt=<export> limit=20 thresholds=[0.9] \\
        sub_block_cache=[false] batch_sizes=[1] decode.sub_block_size=4 out=b.json

    python -m src.bench data                        # data preparation: tokens/s, peak memory

`train` (conf/bench_train.yaml: the training config plus `bench.*`): a training step of each
objective on one batch, timed side by side (`src.training.step_bench`). `decode`
(conf/bench_decode.yaml): AR decoding vs cached parallel decoding of the same prompts, every
variant interleaved (`src.evaluation.decode_bench`); the table is also written as JSON to `out`.
`data` (conf/bench_data.yaml): `prepare` by corpus size and worker count, each in a fresh
process, its time and peak memory (`src.data.prepare_bench`).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, as_lists
from src.config.files import check_output_file, write_text
from src.data.prepare_bench import bench_prepare, extrapolate, print_prepare_table
from src.evaluation.decode_bench import bench_decode, print_decode_table
from src.model import build_tokenizer, check_model_source
from src.training.step_bench import bench_train, print_train_table

USAGE = (
    "usage: python -m src.bench train [hydra overrides] [bench.steps=N]\n"
    "       python -m src.bench decode ckpt=<export> ar_ckpt=<AR export> [overrides]\n"
    "       python -m src.bench data [hydra overrides] [bench.tokens=[N,...]]"
)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_train")
def train(cfg: DictConfig) -> None:
    try:
        if cfg.bench.out:
            check_output_file("bench.out", cfg.bench.out)
        rows = bench_train(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    print_train_table(rows)
    if cfg.bench.out:
        report = {"diffusion": OmegaConf.to_container(cfg.diffusion), "rows": rows}
        write_text(cfg.bench.out, json.dumps(report, indent=2))
        print(f"wrote {cfg.bench.out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_decode")
def decode(cfg: DictConfig) -> None:
    try:
        report = bench_decode(cfg)
    except ValueError as err:  # ConfigError included: one line, before any decoding
        raise SystemExit(f"error: {err}") from None
    print_decode_table(report)
    write_text(cfg.out, json.dumps(report, indent=2))
    print(f"wrote {cfg.out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_data")
def data(cfg: DictConfig) -> None:
    try:
        as_lists(
            cfg,
            {"bench.tokens": "[1000000]", "bench.num_proc": "[1]", "bench.sources": "[synthetic]"},
        )
        check_output_file("bench.out", cfg.bench.out)
        check_model_source(cfg.model)
        rows = bench_prepare(
            build_tokenizer(cfg.model),
            seq_len=cfg.data.seq_len,
            block_size=cfg.data.block_size,
            sizes=list(cfg.bench.tokens),
            num_procs=list(cfg.bench.num_proc),
            sources=list(cfg.bench.sources),
        )
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    print_prepare_table(rows)
    print(extrapolate(rows))
    write_text(cfg.bench.out, json.dumps({"seq_len": cfg.data.seq_len, "rows": rows}, indent=2))
    print(f"wrote {cfg.bench.out}")


COMMANDS = {"train": train, "decode": decode, "data": data}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(USAGE)
    command = sys.argv.pop(1)  # Hydra reads the overrides that follow it
    COMMANDS[command]()


if __name__ == "__main__":
    main()
