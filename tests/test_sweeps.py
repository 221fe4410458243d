"""W&B sweep files (sweeps/): every grid point an agent would run composes with Hydra, and a
small grid runs for real as a Hydra multirun on CPU (train over block sizes -> decode grid on one
export -> report). The W&B server is unreachable here; its logging falls back to offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.config import ConfigError
from src.config.launch import check_sweep, entry_and_overrides, sweep_commands
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def load(name: str) -> dict:
    return yaml.safe_load((SWEEPS / name).read_text())


def test_agent_command_lines_are_the_grid():
    sweep = load("decode_grid.yaml")
    commands = sweep_commands(sweep)
    sub_blocks = sweep["parameters"]["decode.sub_block_size"]["values"]
    thresholds = sweep["parameters"]["decode.threshold"]["values"]
    assert len(commands) == len(sub_blocks) * len(thresholds)
    assert commands[0][:4] == ["/usr/bin/env", sys.executable, "-m", "src.eval"]
    points = {tuple(c[-2:]) for c in commands}
    assert (
        f"decode.sub_block_size={sub_blocks[0]}",
        f"decode.threshold={thresholds[-1]}",
    ) in points


def test_block_size_sweep_composes_with_decode_block_size_tied():
    configs = check_sweep(SWEEPS / "block_size.yaml")
    values = load("block_size.yaml")["parameters"]["diffusion.block_size"]["values"]
    assert [c.diffusion.block_size for c in configs] == values
    assert all(c.decode.block_size == c.diffusion.block_size for c in configs)
    assert all(c.data.seq_len % c.diffusion.block_size == 0 for c in configs)


def test_decode_grid_composes_with_the_eval_config_and_never_trains():
    if not (ROOT / "conf" / "eval.yaml").exists():
        pytest.skip("conf/eval.yaml (the src.eval entry) does not exist yet")
    sweep = load("decode_grid.yaml")
    assert entry_and_overrides(sweep_commands(sweep)[0])[0] == "src.eval"
    configs = check_sweep(SWEEPS / "decode_grid.yaml")
    assert len(configs) == 24 and all("trainer" not in c and "optim" not in c for c in configs)
    assert {(c.decode.sub_block_size, c.decode.threshold) for c in configs} == {
        (s, t)
        for s in sweep["parameters"]["decode.sub_block_size"]["values"]
        for t in sweep["parameters"]["decode.threshold"]["values"]
    }


def test_a_parameter_that_is_not_a_config_key_is_a_one_line_error(tmp_path):
    sweep = load("block_size.yaml")
    sweep["parameters"] = {"diffusion.blok_size": {"values": [8, 16]}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(
        ConfigError, match=r"sweep parameter diffusion\.blok_size is not a key"
    ) as err:
        check_sweep(path)
    assert "\n" not in str(err.value)


def multirun(entry: str, sweep_dir: Path, *overrides: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", entry, "-m", f"hydra.sweep.dir={sweep_dir}", *overrides],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_small_grid_for_real_then_report(artifacts, tmp_path):
    # The block-size sweep's fixed overrides (W&B logging included, offline), two block sizes.
    fixed = entry_and_overrides(load("block_size.yaml")["command"])[1]
    fixed = [o for o in fixed if not o.startswith(("${", "hydra.run.dir="))]
    multirun(
        "src.train",
        tmp_path / "train",
        *fixed,
        *SMALL,
        f"paths.artifacts_dir={artifacts}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "diffusion.block_size=8,16",
    )
    for num, block_size in enumerate((8, 16)):
        settings = OmegaConf.load(tmp_path / "train" / str(num) / "export" / "diffusion.json")
        assert settings.block_size == block_size
    assert list((tmp_path / "train" / "0").glob("wandb/offline-run-*"))

    multirun(
        "src.eval",
        tmp_path / "eval",
        f"ckpt={tmp_path}/train/1/export",
        "benchmark=synthetic",
        "limit=4",
        "decode.max_new_tokens=32",
        "decode.sub_block_size=4,8",
        "decode.threshold=0.9,1.0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "src.report", str(tmp_path / "eval")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "eval" / "report.md").read_text().splitlines()
    assert len(table) == 2 + 4 and all("| 16 |" in line for line in table[2:])
    assert (tmp_path / "eval" / "pareto.png").exists()
