"""Speed/accuracy report of a decode sweep (`python -m src.report`): a markdown table and the
Pareto front as a PNG.

Reads every `metrics.json` (written by `python -m src.eval`) under the directory and writes
`report.md` and `pareto.png` there (or to `--out`). A run is on the Pareto front when no other
run is both at least as accurate and at least as fast (and better in one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from src.config.files import atomic_file, write_text

COLUMNS = [
    ("run", "run"),
    ("decoder", "decoder"),
    ("block", "block_size"),
    ("sub-block", "sub_block_size"),
    ("threshold", "threshold"),
    ("sub-block cache", "use_sub_block_cache"),
    ("score", "score"),
    ("tokens/s", "tokens_per_second"),
    ("tokens/forward", "tokens_per_forward"),
    ("Pareto", "pareto"),
]


def row(run: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One run's table row from the contents of its metrics.json."""
    decode = metrics.get("decode") or {}
    return {
        "run": run,
        "benchmark": metrics.get("benchmark"),
        "metric": metrics["metric"],
        "decoder": metrics.get("decoder", "diffusion"),
        "block_size": decode.get("block_size"),
        "sub_block_size": decode.get("sub_block_size"),
        "threshold": decode.get("threshold"),
        "use_sub_block_cache": decode.get("use_sub_block_cache"),
        "score": float(metrics[metrics["metric"]]),
        "tokens_per_second": float(metrics["tokens_per_second"]),
        "tokens_per_forward": float(metrics["tokens_per_forward"]),
    }


def read_runs(root: str | Path) -> list[dict[str, Any]]:
    """Rows of every metrics.json under `root` (one per run directory)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory: pass a multirun or sweep directory")
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
            rows.append(row(str(path.parent.relative_to(root)) or ".", metrics))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err.msg}): rerun its src.eval") from None
        except (KeyError, TypeError) as err:  # not src.eval's, or written by an older one
            missing = f"the key {err.args[0]!r}" if isinstance(err, KeyError) else "its fields"
            raise ValueError(
                f"{path} lacks {missing}: not a metrics.json of src.eval; remove it, or rerun "
                "its evaluation"
            ) from None
    if not rows:
        raise ValueError(f"no metrics.json under {root}: run `python -m src.eval -m ...` there")
    return rows


def read_wandb_sweep(path: str) -> list[dict[str, Any]]:
    """Rows of the finished runs of a W&B sweep (`entity/project/sweep_id`), via the W&B API."""
    from src.config.loggers import reachable

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    if os.environ.get("WANDB_MODE") == "offline" or not reachable(host):
        raise ValueError(
            f"W&B server {host} unreachable (or WANDB_MODE=offline): report from the run "
            "directories instead (python -m src.report <dir>)"
        )
    import wandb

    rows = []
    for run in wandb.Api().sweep(path).runs:
        if run.state != "finished":
            continue
        # src.eval logs its numbers as eval/<key> and its Hydra config as the run config.
        metrics = {k.removeprefix("eval/"): v for k, v in run.summary.items()}
        metrics["metric"] = next((m for m in ("accuracy", "pass@1") if m in metrics), "accuracy")
        metrics["benchmark"] = (run.config.get("benchmark") or {}).get("name")
        metrics["decoder"] = run.config.get("decoder")
        metrics["decode"] = run.config.get("decode")
        rows.append(row(run.name, metrics))
    if not rows:
        raise ValueError(f"W&B sweep {path} has no finished runs")
    return rows


def mark_pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sets `pareto` on every row; returns the front sorted by tokens/s (fastest first)."""
    for r in rows:
        r["pareto"] = not any(
            o["score"] >= r["score"]
            and o["tokens_per_second"] >= r["tokens_per_second"]
            and (o["score"], o["tokens_per_second"]) != (r["score"], r["tokens_per_second"])
            for o in rows
        )
    return sorted((r for r in rows if r["pareto"]), key=lambda r: -r["tokens_per_second"])


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(rows: Iterable[dict[str, Any]]) -> str:
    """The table, fastest first; the score column is named after the benchmark's metric."""
    rows = sorted(rows, key=lambda r: -r["tokens_per_second"])
    names = {r["metric"] for r in rows}
    score = names.pop() if len(names) == 1 else "score"
    header = [score if key == "score" else title for title, key in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r[key]) for _, key in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def label(r: Mapping[str, Any]) -> str:
    if r["decoder"] != "diffusion":
        return r["decoder"]
    return f"s={r['sub_block_size']} t={r['threshold']}"


def plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: str | Path) -> None:
    """Accuracy vs tokens/s, every run labelled by sub-block size and threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([r["tokens_per_second"] for r in rows], [r["score"] for r in rows], c="tab:gray")
    ax.plot(
        [r["tokens_per_second"] for r in front],
        [r["score"] for r in front],
        "o-",
        c="tab:red",
        label="Pareto front",
    )
    for r in rows:
        ax.annotate(
            label(r),
            (r["tokens_per_second"], r["score"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("tokens / s")
    ax.set_ylabel(rows[0]["metric"])
    ax.set_title(f"{rows[0]['benchmark']}: speed vs {rows[0]['metric']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """Writes report.md and pareto.png into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    front = mark_pareto(rows)
    table, figure = out / "report.md", out / "pareto.png"
    # Each whole or not at all: a failed rerun keeps the previous report readable.
    write_text(table, markdown(rows))
    with atomic_file(figure) as tmp:
        plot(rows, front, tmp)
    return table, figure
