"""Lightning's DeepSpeedStrategy end to end, through the entry point cluster users run:

    python -m src.train experiment=tiny strategy=deepspeed_zero3 trainer.accelerator=cpu
        trainer.devices=2 trainer.precision=32-true trainer.accumulate_grad_batches=4

on 2 gloo ranks with DeepSpeed's CPU accelerator (`src.training.strategy`: Lightning's strategy,
its CUDA-only check lifted on CPU). Three runs of the same seed and data, 6 optimizer steps of
2 ranks x 4 accumulated micro-batches of 2 contexts (an epoch is 3 steps): plain DDP (the
reference), ZeRO-2, and ZeRO-3 with `callbacks=decode_eval`, preempted by SLURM's signal in the
middle of an accumulation window and started again in the same run directory. The ZeRO-3 run
also gives the checkpoint folders, their retention and `last.ckpt`, and the HF exports.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from src.model import read_settings
from tests.conftest import ROOT, SMALL, logged, run_train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}

STEPS, ACCUMULATE, EVERY = 6, 4, 2
# DDP and DeepSpeed reduce gradients in different orders (fp32): the curves agree to ~2e-5 here.
# A run that resumes mid-step, or weights micro-batches otherwise, is off by > 1e-3.
LOSS_ATOL = 1e-4
# SLURM's signal arrives at batch 9 (counted over the fit, from 0) of rank 0: the second
# micro-batch of step 2 (batches 8-11); the checkpoint must wait for step 2 to end.
SIGNAL_BATCH = 9


def common(artifacts: Path, run_dir: Path) -> list[str]:
    return [
        "experiment=tiny",
        f"paths.artifacts_dir={artifacts}",
        f"paths.export_dir={run_dir}/export",
        "data.batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"trainer.accumulate_grad_batches={ACCUMULATE}",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=3",  # optimizer steps
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
    ]


@pytest.fixture(scope="module")
def ddp(artifacts, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    run_train(run_dir, *common(artifacts, run_dir), "strategy=ddp", timeout=900)
    return run_dir


@pytest.fixture(scope="module")
def zero2(artifacts, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2")
    run_train(run_dir, *common(artifacts, run_dir), "strategy=deepspeed_zero2", timeout=900)
    return run_dir


def zero3_overrides(artifacts: Path, run_dir: Path) -> list[str]:
    return [
        *common(artifacts, run_dir),
        "strategy=deepspeed_zero3",
        "callbacks=decode_eval",
        "callbacks.decode_eval.limit=3",  # rank 0 decodes 2 problems, rank 1 one
        f"callbacks.decode_eval.every_n_steps={EVERY}",
        "callbacks.decode_eval.batch_size=1",  # rank 0 makes more forwards than rank 1
        "decode.max_new_tokens=16",
    ]


@pytest.fixture(scope="module")
def zero3(artifacts, tmp_path_factory) -> tuple[Path, str, str]:
    """The preempted ZeRO-3 run and its resumption: (run dir, first log, second log)."""
    run_dir = tmp_path_factory.mktemp("zero3")
    overrides = zero3_overrides(artifacts, run_dir)
    signal = [
        "+callbacks.signal_at._target_=tests.fixtures.callbacks.SignalAt",
        f"+callbacks.signal_at.batch={SIGNAL_BATCH}",
    ]
    first = run_train(run_dir, *overrides, *signal, timeout=900)
    second = run_train(run_dir, *overrides, timeout=900)  # the requeued job: same directory
    return run_dir, first.stdout + first.stderr, second.stdout + second.stderr


def logged_version(run_dir: Path, version: int, key: str) -> dict[int, float]:
    """`key` by step in one attempt's CSV (`csv/version_<version>`)."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def assert_same_curve(run: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(run) == sorted(reference) == list(range(STEPS))
    for step, loss in reference.items():
        assert run[step] == pytest.approx(loss, abs=LOSS_ATOL), (step, run, reference)


@pytest.mark.slow
def test_zero2_follows_the_ddp_loss_curve(ddp, zero2):
    assert_same_curve(logged(zero2, "train/loss"), logged(ddp, "train/loss"))
    # Validation every 3 optimizer steps (12 micro-batches), not every 3 batches.
    assert sorted(logged(zero2, "val/loss")) == sorted(logged(ddp, "val/loss")) == [2, 5]
    assert read_settings(str(zero2 / "export"))["trained_steps"] == STEPS


@pytest.mark.slow
def test_zero3_preempted_mid_step_resumes_onto_the_ddp_curve(ddp, zero3):
    run_dir, first, second = zero3
    assert "DeepSpeed on 2 CPU rank(s)" in first  # the strategy says what it lifted
    # The signal came in step 2's second micro-batch; the checkpoint waited for its end.
    assert "preempted.ckpt written at step 3, stopping" in first
    assert "Restoring states from the checkpoint path at" in second
    assert "preempted.ckpt" in second.split("Restoring states from the checkpoint path at")[1]
    attempts = [logged_version(run_dir, v, "train/loss") for v in (0, 1)]
    assert sorted(attempts[0]) == [0, 1, 2] and sorted(attempts[1]) == [3, 4, 5]
    assert_same_curve(logged(run_dir, "train/loss"), logged(ddp, "train/loss"))


@pytest.mark.slow
def test_zero3_checkpoint_folders_last_and_retention(zero3):
    run_dir, _, second = zero3
    ckpt_dir = run_dir / "checkpoints"
    # The newest two periodic checkpoints (DeepSpeed folders), last.ckpt linking to the newest,
    # and the preemption checkpoint gone once a newer one exists.
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "last.ckpt",
        "step000004.ckpt",
        "step000006.ckpt",
    ]
    assert (ckpt_dir / "last.ckpt").is_symlink()
    assert (ckpt_dir / "last.ckpt").resolve().name == "step000006.ckpt"
    for name in ("step000004.ckpt", "step000006.ckpt"):
        shards = list((ckpt_dir / name / "checkpoint").glob("*optim_states.pt"))
        assert (ckpt_dir / name / "latest").read_text().strip() == "checkpoint"
        assert len(shards) == 2  # one optimizer shard per rank
    assert "preempted.ckpt superseded by" in second


@pytest.mark.slow
def test_the_export_from_the_zero3_checkpoint_equals_the_trained_weights(zero3, tmp_path):
    from src.training.zero_export import export_lightning_zero_checkpoint

    run_dir, _, _ = zero3
    trained = load_file(run_dir / "export" / "model.safetensors")  # HFExport, end of fit
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    for dtype in (torch.float32, torch.bfloat16):
        export = tmp_path / str(dtype)
        export_lightning_zero_checkpoint(checkpoint, str(export), dtype=dtype)
        weights = load_file(export / "model.safetensors")
        assert weights.keys() == trained.keys()
        for name, value in trained.items():
            torch.testing.assert_close(weights[name], value.to(dtype), rtol=0, atol=0, msg=name)
        settings = read_settings(str(export))
        assert settings == read_settings(str(run_dir / "export"))
        assert settings["trained_steps"] == STEPS


@pytest.mark.slow
def test_a_finished_zero3_run_without_its_export_reruns_only_the_export(artifacts, zero3, tmp_path):
    # The state a failed export leaves (the final step checkpointed, no export), rerun as is.
    run_dir, _, _ = zero3
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True, ignore=shutil.ignore_patterns("export"))
    result = run_train(copy, *zero3_overrides(artifacts, copy), timeout=900)
    assert f"resumed at step {STEPS}, the last: nothing to train" in result.stdout + result.stderr
    assert logged(copy, "train/loss") == logged(run_dir, "train/loss")  # no step trained
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step000004.ckpt",
        "step000006.ckpt",
    ]
    trained = load_file(run_dir / "export" / "model.safetensors")
    exported = load_file(copy / "export" / "model.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[name], value) for name, value in trained.items())
    assert read_settings(str(copy / "export")) == read_settings(str(run_dir / "export"))


@pytest.mark.slow
def test_decode_eval_with_uneven_shards_inside_the_zero3_run(zero3):
    run_dir, _, _ = zero3
    scored = logged(run_dir, "decode_eval/synthetic/num_scored")
    # Every 2 steps, and at the end of each attempt (the preempted one stopped at step 3).
    assert sorted(scored) == [2, 3, 4, 6] and set(scored.values()) == {3.0}
    assert all(v > 0 for v in logged(run_dir, "decode_eval/synthetic/tokens_per_forward").values())
    assert not logged(run_dir, "decode_eval/synthetic/failed")
    # Training went on after each evaluation (step 2's, 4's): the steps after them are logged.
    assert {3, 5} <= set(logged(run_dir, "train/loss"))


@pytest.mark.slow
def test_a_diverged_zero2_run_skips_its_bad_steps_and_checkpoints_the_last_good_one(
    artifacts, tmp_path
):
    # Step 0 is finite, 1 and 2 are not (one tolerated, then the stop): DeepSpeed's own overflow
    # check skips their updates; the guard checkpoints the state after step 0.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            f"hydra.run.dir={tmp_path}",
            *SMALL,
            *common(artifacts, tmp_path)[:-1],  # all but the checkpoint interval
            "callbacks.model_checkpoint.every_n_train_steps=5",
            "strategy=deepspeed_zero2",
            "optim.lr=1e6",
            "optim.warmup_steps=0",
            "callbacks.finite_loss.tolerated_steps=1",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode != 0
    said = result.stderr.strip().splitlines()[-1]
    ckpt = tmp_path / "checkpoints" / "step000003.ckpt"
    assert said.startswith(
        "error: training diverged: the loss or its gradients were not finite from step 1 to 2"
    ), said
    assert f"resume from {ckpt} (the last good step)" in said
    assert (tmp_path / "checkpoints" / "last.ckpt").resolve() == ckpt
    assert not (tmp_path / "export").exists()
    state = torch.load(
        ckpt / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    assert (state["global_step"], state["global_steps"], state["skipped_steps"]) == (3, 3, 2)
    initial = load_file(artifacts / "tiny_ar" / "model.safetensors")
    weights = {k.removeprefix("model."): v for k, v in state["module"].items()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    changed = [k for k, v in initial.items() if not torch.equal(weights[k], v.to(weights[k]))]
    assert changed  # step 0's update is in it
