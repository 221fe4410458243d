"""What `python -m src.eval` does: check the config, decode and score a benchmark with an
export, write `metrics.json` and `samples.jsonl` into the run directory, log to the loggers.

Under `torchrun` (several processes, e.g. one per GPU) the problems are spread over the ranks
(`evaluate_distributed`) and rank 0 writes the files, the same as one process would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, instantiate
from src.config.files import write_text
from src.decoding import check_export, load_decoder_from_config
from src.evaluation.benchmarks import get
from src.evaluation.protocol import protocol_record
from src.evaluation.runner import Evaluation, check_context, evaluate_distributed, metric_name
from src.model.export import local_device

log = logging.getLogger(__name__)


def evaluate_export(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Check the config, decode and score, write the run's files; returns metrics.json's dict."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("pass ckpt=<export dir>, e.g. ckpt=artifacts/tiny")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit={cfg.limit} must be >= 1 (or null for all problems)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    share = cfg.max_scorer_error_share
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ConfigError(f"max_scorer_error_share={share!r} must be a number in [0, 1]")
    check_export(cfg.ckpt, cfg.decode, cfg.decoder)
    options = {k: v for k, v in OmegaConf.to_container(cfg.benchmark).items() if k != "_target_"}
    benchmark = get(**options)
    benchmark.check()  # e.g. no sandbox for model-written code: fail now, not after decoding
    problems = benchmark.load(limit=cfg.limit)
    loggers = [instantiate(c) for c in cfg.logger.values()]

    rank = join_process_group()
    decoder = load_decoder_from_config(cfg)
    check_context(decoder, benchmark, problems)
    evaluation = evaluate_distributed(
        decoder, benchmark, problems, batch_size=cfg.batch_size, progress=rank == 0
    )
    if evaluation is None:
        raise RuntimeError("the evaluation failed on a rank: see the error logged above")
    metric = metric_name(benchmark)
    metrics = {
        "benchmark": benchmark.name,
        "metric": metric,
        **evaluation.metrics(metric),
        **({"by_task": by_task} if (by_task := evaluation.by_task()) else {}),
        **({"code_execution": execution} if (execution := benchmark.execution()) else {}),
        # A hub id as given (its snapshot folder is the hub cache's business).
        "ckpt": os.path.abspath(cfg.ckpt) if os.path.exists(cfg.ckpt) else cfg.ckpt,
        # A checkpoint this pipeline did not write (src.model.released): its format.
        **({"imported": imported} if (imported := decoder.export.settings.get("imported")) else {}),
        "decoder": cfg.decoder,
        "decode": decoder.settings.as_dict(),
        "protocol": protocol_record(benchmark, decoder, cfg.limit),
        "batch_size": cfg.batch_size,
        "limit": cfg.limit,
        "trained": decoder.export.settings,
        "device": str(decoder.export.model.device),
        "dtype": str(decoder.export.model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "processes": torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else 1,
    }
    if rank == 0:
        write_run_files(output_dir, metrics, evaluation)
        log_to(loggers, cfg, metrics, evaluation)
    check_scorer_errors(metrics, share)
    return metrics


def check_scorer_errors(metrics: dict[str, Any], max_share: float) -> None:
    """ValueError when the scorer failed on more than `max_share` of the responses: those
    count as wrong, so the score would measure the scorer (or the data), not the model. The
    run's files are written first; the exit status says the number is no result."""
    errors, scored = metrics["score_errors"], metrics["num_scored"]
    if scored and errors / scored > max_share:
        raise ValueError(
            f"the scorer failed on {errors} of {scored} responses (more than "
            f"max_scorer_error_share={max_share}): {metrics['metric']} "
            f"{metrics[metrics['metric']]:.4f} is no result; see the warnings above"
        )


def join_process_group() -> int:
    """This process's rank; under `torchrun` (WORLD_SIZE > 1) it joins the process group first
    (NCCL on GPUs, gloo on CPU). On GPUs each process takes its own (`local_device`) first:
    NCCL puts a collective's tensors on the current device, cuda:0 for every rank otherwise."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        device = local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def write_run_files(output_dir: str, metrics: dict[str, Any], evaluation: Evaluation) -> None:
    """samples.jsonl, then metrics.json, each whole or not at all (`src.config.files`): a
    metrics.json is only ever beside the samples it scored, and a rerun that fails keeps the
    previous pair."""
    write_text(
        os.path.join(output_dir, "samples.jsonl"),
        "".join(json.dumps(sample) + "\n" for sample in evaluation.samples),
    )
    write_text(os.path.join(output_dir, "metrics.json"), json.dumps(metrics, indent=2))


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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        + (
            f" ({', '.join(f'{n} {k}' for k, n in metrics['forwards_by_kind'].items())}) | "
            f"{metrics['acceptance_length']:.2f} tokens accepted per verification"
            if metrics["acceptance_length"]
            else ""
        )
    )
