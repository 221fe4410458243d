"""Evaluate an export on a benchmark with cached parallel decoding (or the AR baseline).

    python -m src.eval ckpt=artifacts/tiny benchmark=synthetic
    python -m src.eval ckpt=<export> benchmark=humaneval decode.threshold=0.9 limit=20
    python -m src.eval ckpt=<export> benchmark=gsm8k decoder=ar
    python -m src.eval -m ckpt=<export> decode.threshold=1.0,0.9,0.7   # one directory per run
    python -m src.eval ckpt=<export> logger=wandb                      # also to W&B (offline ok)
    torchrun --nproc_per_node 8 -m src.eval ckpt=<export> benchmark=gsm8k hydra.run.dir=<dir>

Writes `metrics.json` (score, per task family where the benchmark has them, decoding speed,
the full decode config, versions, git commit) and `samples.jsonl` (prompt, response, score)
into the run directory, and prints the score and tokens/s last. `decode.block_size` defaults
to the export's trained block size; the token budget and threshold to the benchmark's protocol
(SPEC 4.1: its config's `decode` block, recorded under `protocol`). `ckpt` may also be a
released Fast-dLLM v2 checkpoint or a hub id (`src.model.released`).
"""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.evaluation.run import evaluate_export, summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = evaluate_export(cfg, output_dir)
    except ValueError as err:  # ConfigError included: one line, before any decoding
        raise SystemExit(f"error: {err}") from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"metrics: {output_dir}/metrics.json (samples.jsonl beside it)")
        print(summary(metrics), flush=True)
    return metrics[metrics["metric"]]


if __name__ == "__main__":
    main()
