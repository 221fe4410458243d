"""The paper's Table 1 from a `python -m src.paper` run folder, beside the published numbers.

A run folder holds `paper.json` (what was run) and, per row and decoder, either a `src.eval`
run (`<row>/<decoder>/metrics.json`) or an lm-eval task's result (`<row>/<decoder>/lm_eval.json`,
`src.evaluation.paper`); `error.txt` there marks a run that failed. A row with neither is
missing, never 0. Scores are percentages (the paper's); the average is taken over the rows every
decoder has, with the published average over the same rows beside it; tokens/s and tokens
per forward sum over each decoder's src.eval runs. `python -m src.report <run folder>` writes
`table1.md` and `table1.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from src.config.files import write_text

MANIFEST = "paper.json"
# Table 1's rows, in the paper's order: the row key (a benchmark's name) and its title.
ROWS = (
    ("humaneval", "HumanEval"),
    ("humaneval_plus", "HumanEval+"),
    ("mbpp", "MBPP"),
    ("mbpp_plus", "MBPP+"),
    ("gsm8k", "GSM8K"),
    ("math", "MATH"),
    ("ifeval", "IFEval"),
    ("mmlu", "MMLU"),
    ("gpqa", "GPQA"),
)
# The paper's Table 1 (SPEC section 4): Fast-dLLM v2 per benchmark and on average, and the
# average of its AR baseline (Qwen2.5-Instruct of the same size).
PUBLISHED = {
    "7B": {
        "humaneval": 63.4,
        "humaneval_plus": 58.5,
        "mbpp": 63.0,
        "mbpp_plus": 52.3,
        "gsm8k": 83.7,
        "math": 61.6,
        "ifeval": 61.4,
        "mmlu": 66.6,
        "gpqa": 31.9,
        "average": 60.3,
        "ar_average": 58.2,
    },
    "1.5B": {
        "humaneval": 43.9,
        "humaneval_plus": 40.2,
        "mbpp": 50.0,
        "mbpp_plus": 41.3,
        "gsm8k": 62.0,
        "math": 38.1,
        "ifeval": 47.0,
        "mmlu": 55.1,
        "gpqa": 27.7,
        "average": 45.0,
        "ar_average": 44.3,
    },
}
# The paper's speed figures (SPEC section 4: 7B, GSM8K, A100, batch 1), for the note under the table.
PUBLISHED_SPEED = (
    "paper, 7B on GSM8K (A100, batch 1): 39.1 tokens/s at threshold 1.0, 101.7 at 0.9; "
    "about 2.5x Qwen2.5-7B-Instruct's AR decoding"
)


def read_cell(folder: Path) -> dict[str, Any]:
    """One decoder's result on one row: a score (%) and where it came from, `failed` with
    the error, or `missing`."""
    if (folder / "metrics.json").is_file():
        metrics = json.loads((folder / "metrics.json").read_text())
        return {
            "source": "src.eval",
            "score": 100 * float(metrics[metrics["metric"]]),
            "num_scored": metrics["num_scored"],
            "follows": (metrics.get("protocol") or {}).get("follows", False),
            "tokens": metrics["tokens"],
            "forwards": metrics["forwards"],
            "seconds": metrics["seconds"],
            "max_new_tokens": metrics["decode"]["max_new_tokens"],
            "threshold": metrics["decode"]["threshold"],
        }
    if (folder / "lm_eval.json").is_file():
        result = json.loads((folder / "lm_eval.json").read_text())
        return {
            "source": "lm_eval",
            "score": 100 * float(result["score"]),
            "follows": result["follows"],
            "task": result["task"],
        }
    if (folder / "error.txt").is_file():
        return {"failed": (folder / "error.txt").read_text().strip()}
    return {"missing": True}


def read_table(run: str | Path) -> dict[str, Any]:
    """Table 1 of a run folder, as the dict `table1.json` holds."""
    run = Path(run)
    if not (run / MANIFEST).is_file():
        raise ValueError(f"{run} has no {MANIFEST}: pass a folder `python -m src.paper` wrote")
    manifest = json.loads((run / MANIFEST).read_text())
    decoders, published = manifest["decoders"], PUBLISHED.get(manifest.get("published") or "")
    extra = [(k, k) for k in manifest.get("rows", []) if k not in dict(ROWS)]
    rows = [
        {
            "row": key,
            "title": title,
            "in_paper": key in dict(ROWS),
            "cells": {d: read_cell(run / key / d) for d in decoders},
            "published": (published or {}).get(key),
        }
        for key, title in (*ROWS, *extra)
    ]
    scored = [r for r in rows if r["in_paper"] and all("score" in c for c in r["cells"].values())]
    average = {
        d: sum(r["cells"][d]["score"] for r in scored) / len(scored) if scored else None
        for d in decoders
    }
    speed = {}
    for d in decoders:
        runs = [r["cells"][d] for r in rows if r["cells"][d].get("source") == "src.eval"]
        tokens = sum(c["tokens"] for c in runs)
        seconds, forwards = sum(c["seconds"] for c in runs), sum(c["forwards"] for c in runs)
        speed[d] = {
            "tokens_per_second": tokens / seconds if seconds else None,
            "tokens_per_forward": tokens / forwards if forwards else None,
        }
    return {
        "ckpt": manifest["ckpt"],
        "ar_ckpt": manifest["ar_ckpt"],
        "decoders": decoders,
        "checkpoints": manifest["checkpoints"],
        "settings": manifest["settings"],
        "published_model": manifest.get("published"),
        "rows": rows,
        "average": {
            "rows": [r["row"] for r in scored],
            "scores": average,
            "published": (
                sum(published[r["row"]] for r in scored) / len(scored)
                if published and scored
                else None
            ),
            "published_all_rows": (published or {}).get("average"),
            "published_ar_all_rows": (published or {}).get("ar_average"),
        },
        "speed": speed,
    }


def _score(cell: dict[str, Any]) -> str:
    if "score" in cell:
        return f"{cell['score']:.1f}" + ("" if cell["follows"] else "*")
    return "failed" if "failed" in cell else "missing"


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(table: dict[str, Any]) -> str:
    """Table 1 as markdown: one column per decoder, the published row beside them."""
    decoders = table["decoders"]
    paper = f"paper (Fast-dLLM v2 {table['published_model']})" if table["published_model"] else ""
    header = [
        "benchmark",
        *[f"{d} ({table['checkpoints'][d]})" for d in decoders],
        *([paper] if paper else []),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["rows"]:
        cells = [_score(r["cells"][d]) for d in decoders]
        lines.append(
            "| "
            + " | ".join([r["title"], *cells, *([_number(r["published"])] if paper else [])])
            + " |"
        )
    average = table["average"]
    n = len(average["rows"])
    lines.append(
        "| "
        + " | ".join(
            [
                f"average ({n} of {len(ROWS)} rows)",
                *[_number(average["scores"][d]) for d in decoders],
                *([_number(average["published"])] if paper else []),
            ]
        )
        + " |"
    )
    for key, title, digits in (
        ("tokens_per_second", "tokens/s", 1),
        ("tokens_per_forward", "tokens/forward", 2),
    ):
        speeds = [_number(table["speed"][d][key], digits) for d in decoders]
        lines.append("| " + " | ".join([title, *speeds, *([""] if paper else [])]) + " |")
    notes = [
        "",
        "Scores in %; `missing`: no run of that row, `failed`: its run failed (error.txt); "
        "`*`: not the released protocol (a `limit`, or another budget or threshold).",
        f"Average over the rows every decoder has: {', '.join(average['rows']) or 'none'}.",
    ]
    if average["published_all_rows"] is not None:
        notes.append(
            f"Paper, all 9 rows: Fast-dLLM v2 {average['published_all_rows']}, "
            f"Qwen2.5-Instruct AR {average['published_ar_all_rows']}; {PUBLISHED_SPEED}."
        )
    notes.append(f"Settings: {settings_line(table['settings'])} (each run's: table1.json).")
    return "\n".join(lines + notes) + "\n"


def settings_line(settings: dict[str, Any]) -> str:
    """The run's settings that decide the numbers, in one line."""
    decode = settings["decode"]
    values = {
        "limit": settings["limit"],
        "batch_size": settings["batch_size"],
        **{
            key: "each row's protocol" if settings[key] is None else settings[key]
            for key in ("max_new_tokens", "threshold")
        },
        "sub_block_size": decode["sub_block_size"],
        "use_sub_block_cache": decode["use_sub_block_cache"],
    }
    return ", ".join(f"{key} {value}" for key, value in values.items())


def write_table(run: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """`table1.md` and `table1.json` of a run folder, into `out` (default: the folder)."""
    table = read_table(run)
    out = Path(out or run)
    out.mkdir(parents=True, exist_ok=True)
    # Each whole or not at all: a failed rerun keeps the previous table readable.
    write_text(out / "table1.json", json.dumps(table, indent=2))
    write_text(out / "table1.md", markdown(table))
    return out / "table1.md", out / "table1.json"
