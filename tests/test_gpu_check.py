"""The GPU check's CPU dry run (`scripts/gpu_check.sh --cpu`): every part of the script runs on
tiny shapes, writes its JSON, and reports ok (or skipped, with the reason, where it needs CUDA)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["zero2_e2e", "zero3_e2e", "eval_torchrun", "train_step_7b", "decode", "attention"]
DECODE_MODES = ["1_per_forward", "8_per_forward", "32_per_forward"]


def numbers(value: object) -> list[float]:
    """Every int/float inside a JSON value (booleans excluded)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    work = tmp_path_factory.mktemp("gpu_check_work")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--work", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, result


@pytest.mark.slow
def test_every_part_reports(dry_run):
    out, result = dry_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["failed"] == []
    assert summary["table_md"].startswith("## Status")
    assert len(list(out.iterdir())) <= 8  # what the device returns at most
    assert "===== decode" in (out / "gpu_check.log").read_text()
    for part in PARTS:
        report = json.loads((out / f"{part}.json").read_text())
        assert report["part"] == part and report["mode"] == "cpu"
        assert report["versions"]["torch"] and report["versions"]["transformers"]
        assert report["status"] == "ok", report["error"]
        assert report["error"] is None
        assert report["device"]["name"]
        values = numbers(report["results"])
        assert values and all(math.isfinite(v) for v in values)


@pytest.mark.slow
def test_numbers(dry_run):
    out, _ = dry_run
    r = {p: json.loads((out / f"{p}.json").read_text())["results"] for p in PARTS}

    zero = r["zero2_e2e"]
    assert zero["strategy"] == "deepspeed_zero2 (CPU rank)"
    assert zero["resume"]["resumed"] and zero["resume"]["restored_message"]
    assert zero["export_trained_steps"] == zero["zero_to_hf_trained_steps"] == 6
    assert zero["export_vs_zero_to_hf"]["within_atol"]
    assert zero["logits_moved_from_init"] > zero["logits_atol"]
    assert min(zero["decode_eval"]["tokens_per_forward"]) > 0
    assert zero["train_seconds"] > 0 and zero["resume_seconds"] > 0

    zero3 = r["zero3_e2e"]
    assert zero3["strategy"] == "deepspeed_zero3 (CPU rank)"
    assert zero3["preempted_at_step"] == 3 and zero3["restored_message"]  # signal in step 3
    assert zero3["curve"]["same_curve"] and zero3["curve"]["max_abs_loss_diff"] == 0
    assert zero3["curve"]["steps_preempted_then_resumed"] == [0, 1, 2, 3]
    assert zero3["checkpoints_kept"] == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert zero3["export_vs_zero_to_hf"]["max_abs_weight_diff"] == 0
    assert set(zero3["decode_eval"]["num_scored"].values()) == {4.0}

    evaluation = r["eval_torchrun"]
    assert evaluation["backend"] == "gloo" and evaluation["processes"] == 2
    assert evaluation["compare"]["processes"] == [1, 2] and evaluation["compare"]["samples_same"]
    assert all(evaluation["compare"]["same"].values()) and evaluation["compare"]["printed_once"]

    step = r["train_step_7b"]
    for objective, tokens in (("ar", 64), ("block_diffusion", 192)):
        row = step[objective]
        assert row["tokens_through_model"] == tokens
        assert row["seconds_per_step"] > 0 and row["input_tokens_per_second"] > 0
        assert row["grads_finite"] and row["grad_norm"] > 0
        assert row["peak_gib"] is None  # CUDA only
    assert step["block_diffusion_vs_ar"]["time"] > 0

    decode = r["decode"]
    for shape in ("tiny-tied", "tiny-untied"):
        for batch in (1, 8):
            row = decode[shape][f"batch_{batch}"]
            assert row["ms_per_denoising_forward"] > 0
            assert row["ar"]["ms_per_token"] > 0
            assert row["ar"]["all_tokens_generated"]
            per_step = [row[m]["tokens_per_denoising_step"] for m in DECODE_MODES]
            assert per_step[0] == 1 and 7 <= per_step[1] <= 8 and 31 <= per_step[2] <= 32
            for mode in DECODE_MODES:
                assert row[mode]["all_tokens_generated"]
                assert row[mode]["tokens_per_second"] > 0 and row[mode]["ms_per_forward"] > 0
            random_drafts, accepted = row["verified_random"], row["verified_accepted"]
            one_cache = row["verified_one_cache_accepted"]
            for run in (random_drafts, accepted, one_cache):
                assert run["all_tokens_generated"] and run["ms_per_forward"] > 0
                assert sum(run["forwards_by_kind"].values()) == run["forwards"]
            assert random_drafts["same_as_ar"] == 1.0  # fp32: SPEC 6's invariant
            assert random_drafts["acceptance_length"] < accepted["acceptance_length"] == 32
            assert set(one_cache["forwards_by_kind"]) == {"verify+draft"}

    attention = r["attention"]
    assert attention["max_abs_logit_diff"] <= attention["logits_atol"]
    assert attention["setup"]["flex_backward"] == "skipped: no CUDA"
    for backend in ("sdpa", "flex_attention"):
        assert attention[backend]["seconds_per_step"] > 0
        assert attention[backend]["decode"]["ms_per_forward"] > 0


def test_table_of_an_empty_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--table", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.startswith("## Status")
