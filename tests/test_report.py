"""`python -m src.report`: table and Pareto front from metrics.json files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from src.evaluation.report import mark_pareto, read_runs, read_wandb_sweep

ROOT = Path(__file__).resolve().parents[1]
# (sub_block_size, threshold, accuracy, tokens/s): lower thresholds are faster and less accurate;
# (4, 0.7) is slower and less accurate than (8, 0.9), so it is off the front.
GRID = [(8, 1.0, 0.60, 10.0), (8, 0.9, 0.58, 25.0), (8, 0.5, 0.40, 40.0), (4, 0.7, 0.50, 20.0)]


def write_metrics(root: Path, grid=GRID) -> None:
    for num, (sub_block, threshold, accuracy, speed) in enumerate(grid):
        run = root / str(num)
        run.mkdir(parents=True)
        metrics = {
            "benchmark": "synthetic",
            "metric": "accuracy",
            "accuracy": accuracy,
            "tokens_per_second": speed,
            "tokens_per_forward": speed / 10,
            "decoder": "diffusion",
            "decode": {
                "block_size": 32,
                "sub_block_size": sub_block,
                "threshold": threshold,
                "use_sub_block_cache": False,
            },
        }
        (run / "metrics.json").write_text(json.dumps(metrics))


def test_pareto_front_keeps_only_undominated_runs(tmp_path):
    write_metrics(tmp_path)
    rows = read_runs(tmp_path)
    front = mark_pareto(rows)
    assert [(r["sub_block_size"], r["threshold"]) for r in front] == [(8, 0.5), (8, 0.9), (8, 1.0)]
    assert not next(r for r in rows if r["sub_block_size"] == 4)["pareto"]


def test_cli_writes_table_and_png(tmp_path):
    write_metrics(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "src.report", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[0].startswith("| run | decoder | block | sub-block | threshold |")
    assert "| accuracy | tokens/s |" in table[0] and len(table) == 2 + len(GRID)
    assert table[2].startswith("| 2 | diffusion | 32 | 8 | 0.5 |")  # fastest first
    pareto = {line.split(" | ")[0]: line.endswith("| yes |") for line in table[2:]}
    assert pareto == {"| 0": True, "| 1": True, "| 2": True, "| 3": False}
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_empty_directories_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no metrics.json under"):
        read_runs(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        read_runs(tmp_path / "absent")


def test_wandb_source_fails_clearly_when_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match="unreachable .*report from the run directories"):
        read_wandb_sweep("entity/project/sweep")
