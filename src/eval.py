"""Evaluate an export on a benchmark with cached parallel decoding (or the AR baseline).

    python -m src.eval ckpt=artifacts/tiny benchmark=synthetic
    python -m src.eval ckpt=<export> benchmark=humaneval decode.threshold=0.9 limit=20
    python -m src.eval ckpt=<export> benchmark=gsm8k decoder=ar
    python -m src.eval -m ckpt=<export> decode.threshold=1.0,0.9,0.7   # one directory per run
    python -m src.eval ckpt=<export> logger=wandb                      # also to W&B (offline ok)

Writes `metrics.json` (score, per task family where the benchmark has them, decoding speed,
the full decode config, versions, git commit) and `samples.jsonl` (prompt, response, score)
into the run directory, and prints the score and tokens/s last. `decode.block_size` defaults
to the export's trained block size.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Any

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.benchmarks import get
from src.config import DECODERS, ConfigError, resolve_decode
from src.evaluation import Evaluation, evaluate, metric_name
from src.export import load_export, read_settings

log = logging.getLogger(__name__)


def evaluate_export(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Check the config, decode and score, write the run's files; returns metrics.json's dict."""
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit={cfg.limit} must be >= 1 (or null for all problems)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    if cfg.decoder not in DECODERS:
        raise ConfigError(f"decoder={cfg.decoder!r}: choose one of {', '.join(DECODERS)}")
    settings = read_settings(cfg.ckpt)
    decode = resolve_decode(cfg.decode, settings["block_size"])
    options = {k: v for k, v in OmegaConf.to_container(cfg.benchmark).items() if k != "_target_"}
    benchmark = get(**options)
    problems = benchmark.load(limit=cfg.limit)
    loggers = [instantiate(c) for c in cfg.logger.values()]

    export = load_export(
        cfg.ckpt, device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
    )
    evaluation = evaluate(
        export.model,
        export.tokenizer,
        benchmark,
        problems,
        decode=decode,
        mask_token_id=settings["mask_token_id"],
        stop_token_id=settings["stop_token_id"],
        decoder=cfg.decoder,
        batch_size=cfg.batch_size,
        progress=True,
        generator=torch.Generator(export.model.device).manual_seed(cfg.seed),
    )
    metric = metric_name(benchmark)
    metrics = {
        "benchmark": benchmark.name,
        "metric": metric,
        **evaluation.metrics(metric),
        **({"by_task": by_task} if (by_task := evaluation.by_task()) else {}),
        "ckpt": os.path.abspath(cfg.ckpt),
        "decoder": cfg.decoder,
        "decode": decode,
        "batch_size": cfg.batch_size,
        "limit": cfg.limit,
        "trained": settings,
        "device": str(export.model.device),
        "dtype": cfg.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
    }
    write_run_files(output_dir, metrics, evaluation)
    log_to(loggers, cfg, metrics, evaluation)
    return metrics


def write_run_files(output_dir: str, metrics: dict[str, Any], evaluation: Evaluation) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        for sample in evaluation.samples:
            f.write(json.dumps(sample) + "\n")


def log_to(loggers: list, cfg: DictConfig, metrics: dict[str, Any], evaluation: Evaluation) -> None:
    """Metrics (and for W&B a samples table) to each configured logger; a logger's failure
    is a warning, never the loss of a finished evaluation."""
    numbers = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    rows = [[s["prompt"], s["response"], s["score"]] for s in evaluation.samples]
    for logger in loggers:
        try:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            logger.log_metrics(numbers)
            if hasattr(logger, "log_table"):
                logger.log_table(
                    key="eval/samples", columns=["prompt", "response", "score"], data=rows
                )
            logger.finalize("success")
        except Exception:
            log.warning("logger %s failed", type(logger).__name__, exc_info=True)


def git_commit() -> str | None:
    """HEAD of the code's repository, suffixed `-dirty` with uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def summary(metrics: dict[str, Any]) -> str:
    return (
        f"{metrics['benchmark']} ({metrics['decoder']}): {metrics['metric']} "
        f"{metrics[metrics['metric']]:.4f} on {metrics['num_scored']} problems | "
        f"{metrics['tokens_per_second']:.1f} tokens/s | "
        f"{metrics['tokens_per_forward']:.2f} tokens/forward (batch {metrics['batch_size']}) | "
        f"{metrics['unmasked_per_step']:.2f} tokens/step per sequence | "
        f"{metrics['forwards']} forwards"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        metrics = evaluate_export(cfg, HydraConfig.get().runtime.output_dir)
    except ValueError as err:  # ConfigError included: one line, before any decoding
        raise SystemExit(f"error: {err}") from None
    print(f"metrics: {HydraConfig.get().runtime.output_dir}/metrics.json (samples.jsonl beside it)")
    print(summary(metrics), flush=True)
    return metrics[metrics["metric"]]


if __name__ == "__main__":
    main()
