"""What `python -m src.paper` does: every benchmark of Table 1, every decoder, the released
protocol's settings (SPEC 4.1), into one run folder; then the table (`src.evaluation.table`).

Each `benchmarks` entry is a `src.eval` run per decoder (`<run>/<row>/<decoder>/`, the files
`src.eval` writes), decoded under its protocol (`benchmark_decode`; `max_new_tokens` /
`threshold` set every benchmark's at once). Each `lm_eval` entry is an lm-eval task run
through the adapter (`src.evaluation.lm_eval.FastDLLM`) with the chat template and few-shot
examples as multi-turn, as the released eval script runs MMLU, GPQA and IFEval; its score goes
to `<row>/<decoder>/lm_eval.json`. The `ar` decoder decodes `ar_ckpt` (the AR counterpart,
e.g. Qwen2.5-7B-Instruct for the released 7B), every other decoder `ckpt`.

Bad input stops everything before the first decode. A finished run is kept: the same command
into the same run folder (`hydra.run.dir=<it>`) resumes after the last finished run, and
refuses other settings. A run that fails otherwise is logged, leaves `error.txt` and shows as
failed in the table; the others go on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.config.files import write_text
from src.decoding import check_decoder_name, check_export
from src.evaluation.benchmarks import get
from src.evaluation.protocol import benchmark_decode
from src.evaluation.run import evaluate_export, git_commit
from src.evaluation.table import MANIFEST, write_table

log = logging.getLogger(__name__)
# conf/export/ keys a src.eval run takes over.
EXPORT_KEYS = ("device", "dtype", "attn_implementation", "seed")


def checkpoint(cfg: DictConfig, decoder: str) -> str:
    """The checkpoint a decoder decodes: the AR counterpart for `ar`, else `ckpt`."""
    return cfg.ar_ckpt if decoder == "ar" else cfg.ckpt


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def overrides(cfg: DictConfig) -> dict[str, Any]:
    """The paper-level settings that replace every benchmark's protocol value (None: keep)."""
    return {"max_new_tokens": cfg.max_new_tokens, "threshold": cfg.threshold}


def eval_config(cfg: DictConfig, name: str, decoder: str) -> DictConfig:
    """The `src.eval` config of benchmark `name` decoded by `decoder`."""
    options = _plain(cfg.benchmarks[name])
    benchmark = get(**{k: v for k, v in options.items() if k != "_target_"})
    return OmegaConf.create(
        {
            "ckpt": checkpoint(cfg, decoder),
            "decoder": decoder,
            "benchmark": options,
            "decode": benchmark_decode(cfg.decode, benchmark, overrides(cfg)),
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
            "max_scorer_error_share": cfg.max_scorer_error_share,
            "logger": {},
            **{key: cfg[key] for key in EXPORT_KEYS},
        }
    )


def lm_eval_decode(cfg: DictConfig, row: DictConfig) -> dict[str, Any]:
    """The decode settings of an lm-eval row: the decode config under its own protocol. The
    token budget only where the row or `max_new_tokens` sets one: the adapter holds a given
    budget for every request, else each task's `max_gen_toks`."""
    chosen = {k: v for k, v in overrides(cfg).items() if v is not None}
    decode = {k: v for k, v in _plain(cfg.decode).items() if k != "max_new_tokens"}
    return {**decode, **_plain(row.get("decode") or {}), **chosen}


def check(cfg: DictConfig) -> None:
    """Every check that needs no model, for every run (one line, before any decoding)."""
    for key in ("ckpt", "ar_ckpt"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"pass {key}=<checkpoint folder or hub id>")
    if not cfg.decoders:
        raise ConfigError("decoders is empty: pass e.g. decoders=[diffusion,ar]")
    for decoder in cfg.decoders:
        check_decoder_name(decoder)
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit={cfg.limit} must be >= 1 (or null for every problem)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    if not cfg.benchmarks and not cfg.lm_eval:
        raise ConfigError("benchmarks and lm_eval are both empty: nothing to evaluate")
    if clash := set(cfg.benchmarks) & set(cfg.lm_eval):
        raise ConfigError(f"row {sorted(clash)[0]} is both a benchmark and an lm_eval task")
    for decoder in cfg.decoders:
        for name in cfg.benchmarks:
            run = eval_config(cfg, name, decoder)
            check_export(run.ckpt, run.decode, decoder)
            get(**{k: v for k, v in run.benchmark.items() if k != "_target_"}).check()
        for name, row in cfg.lm_eval.items():
            if missing := [k for k in ("task", "metric", "num_fewshot") if row.get(k) is None]:
                raise ConfigError(f"lm_eval.{name} lacks {', '.join(missing)}: see conf/paper.yaml")
            decode = {"max_new_tokens": cfg.decode.max_new_tokens, **lm_eval_decode(cfg, row)}
            check_export(checkpoint(cfg, decoder), decode, decoder)


def manifest(cfg: DictConfig) -> dict[str, Any]:
    """What `paper.json` records: enough to tell a resumed run has the same settings."""
    settings = {
        key: _plain(cfg[key])
        for key in ("decode", "max_new_tokens", "threshold", "limit", "batch_size", "lm_eval")
    }
    settings["benchmarks"] = _plain(cfg.benchmarks)
    return {
        "ckpt": cfg.ckpt,
        "ar_ckpt": cfg.ar_ckpt,
        "decoders": list(cfg.decoders),
        "checkpoints": {d: checkpoint(cfg, d) for d in cfg.decoders},
        "rows": [*cfg.benchmarks, *cfg.lm_eval],
        "published": cfg.published,
        "settings": settings,
    }


def start(cfg: DictConfig, out: Path) -> None:
    """Write paper.json (rank 0), or check on every rank that the one there has these
    settings (a resumed run)."""
    wanted = manifest(cfg)
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        found.pop("git_commit", None)
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise ConfigError(
                f"{out} holds a Table 1 run with other {', '.join(changed)}: pass another "
                "hydra.run.dir, or the settings it was started with"
            )
    elif _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({**wanted, "git_commit": git_commit()}, indent=2))


def _rank() -> int:
    """This process's rank, also before `src.eval` joins the process group (torchrun's RANK)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _failed(folder: Path, error: BaseException) -> None:
    log.exception("%s failed; the other runs go on", folder)
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(f"{type(error).__name__}: {error}\n")


def run_benchmarks(cfg: DictConfig, out: Path) -> None:
    for decoder in cfg.decoders:
        for name in cfg.benchmarks:
            folder = out / name / decoder
            if (folder / "metrics.json").is_file():
                log.info("%s: done before, kept", folder)
                continue
            try:
                evaluate_export(eval_config(cfg, name, decoder), str(folder))
            except ValueError:  # bad input (e.g. a prompt + budget beyond the context)
                raise
            except Exception as error:
                _failed(folder, error)


def run_lm_eval(cfg: DictConfig, out: Path) -> None:
    """The lm-eval rows, on rank 0 only (lm-eval does not spread a model over ranks)."""
    if not cfg.lm_eval or _rank() != 0:
        return
    from lm_eval.tasks import TaskManager

    from src.evaluation.ifeval import use_packaged_punkt

    use_packaged_punkt()  # IFEval's sentence model, offline
    include = cfg.lm_eval_include_path
    tasks = TaskManager(include_path=str(include) if include else None)
    for decoder in cfg.decoders:
        for name, row in cfg.lm_eval.items():
            folder = out / name / decoder
            if (folder / "lm_eval.json").is_file():
                log.info("%s: done before, kept", folder)
                continue
            try:
                result = lm_eval_row(cfg, row, decoder, tasks)
            except Exception as error:
                _failed(folder, error)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            # Whole or not at all: a cell with this file counts as done when the run resumes.
            write_text(folder / "lm_eval.json", json.dumps(result, indent=2, default=str))


def lm_eval_row(cfg: DictConfig, row: DictConfig, decoder: str, tasks: Any) -> dict[str, Any]:
    """One lm-eval task decoded by `decoder`, as lm_eval.json records it."""
    from lm_eval import simple_evaluate

    from src.evaluation.lm_eval import FastDLLM

    decode = lm_eval_decode(cfg, row)
    model = FastDLLM(
        checkpoint(cfg, decoder),
        decoder=decoder,
        batch_size=cfg.batch_size,
        device=cfg.device,
        dtype=cfg.dtype,
        seed=cfg.seed,
        **decode,
    )
    results = simple_evaluate(
        model=model,
        tasks=[row.task],
        num_fewshot=row.num_fewshot,
        apply_chat_template=True,
        fewshot_as_multiturn=row.num_fewshot > 0,
        limit=cfg.limit,
        task_manager=tasks,
        log_samples=False,
    )["results"][row.task]
    released = _plain(row.get("decode") or {})
    return {
        "task": row.task,
        "metric": row.metric,
        "score": results[f"{row.metric},none"],
        "num_fewshot": row.num_fewshot,
        "limit": cfg.limit,
        "decode": model.decoder.settings.as_dict(),
        "follows": cfg.limit is None and all(decode[k] == v for k, v in released.items()),
        "results": results,
    }


def run_paper(cfg: DictConfig, output_dir: str) -> Path | None:
    """Check, run every row with every decoder into `output_dir`, write the table there;
    returns table1.md's path (rank 0; None on other ranks)."""
    check(cfg)
    out = Path(output_dir)
    start(cfg, out)
    run_benchmarks(cfg, out)
    run_lm_eval(cfg, out)
    if _rank() != 0:
        return None
    return write_table(out)[0]
