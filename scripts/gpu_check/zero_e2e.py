"""Parts `zero2_e2e` / `zero3_e2e`: Lightning + DeepSpeed ZeRO end to end through `python -m
src.train` (on CPU ranks in the dry run). `zero2_e2e`: train, checkpoint, resume, HF export,
ZeRO -> HF, logits. `zero3_e2e`: the cluster path of tests/test_deepspeed_lightning.py with
gradient accumulation: an uninterrupted run, and one preempted by SLURM's signal in the middle of
an accumulation window and resumed in its run directory; their loss curves, where the checkpoint
was taken, retention, decode_eval, the HF export against `python -m src.zero_to_hf`."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

from gpu_check.common import Context, child_env, free_port, run_command

ZERO_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
ZERO_SHAPE_CPU = {**ZERO_SHAPE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
# Steps of the first run, the step the second (resumed) run trains to, checkpoint/eval period.
ZERO_STEPS = {"gpu": (30, 40, 10), "cpu": (4, 6, 2)}
# bf16 logits of two loadings of the same weights: identical up to kernel non-determinism.
LOGITS_ATOL = 1e-2


def make_pretrained(folder: Path, shape: dict[str, Any], tied: bool, tokenizer_cache: Path) -> int:
    """A random Qwen2 and the synthetic ChatML tokenizer saved like a hub model (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from src.data.tokenizer import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(tokenizer_cache)
    config = Qwen2Config(
        **shape,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def csv_rows(run_dir: Path, version: int) -> list[dict[str, float]]:
    """Rows of `csv/version_<version>/metrics.csv` with their numeric cells only."""
    import csv

    path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
    if not path.exists():
        raise RuntimeError(f"{path} was not written (logger=csv)")
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            numeric = {}
            for key, value in row.items():
                with contextlib.suppress(TypeError, ValueError):
                    numeric[key] = float(value)
            rows.append(numeric)
    return rows


def metric_series(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), r[key]) for r in rows if key in r and "step" in r]


def compare_logits(
    ctx: Context, reference: Any, candidate: Any, probe: Any
) -> dict[str, float | bool]:
    """Max |logit difference| of two models on `probe` (and of their weights)."""
    import torch

    with torch.no_grad():
        a = reference(probe).logits.float()
        b = candidate(probe).logits.float()
    ref_state = reference.state_dict()
    weight_diff = 0.0
    for name, value in candidate.state_dict().items():
        if name in ref_state:
            diff = (value.float() - ref_state[name].float()).abs().max().item()
            weight_diff = max(weight_diff, diff)
    max_diff = (a - b).abs().max().item()
    return {
        "max_abs_logit_diff": max_diff,
        "logit_std": a.std().item(),
        "max_abs_weight_diff": weight_diff,
        "within_atol": max_diff <= LOGITS_ATOL,
    }


def load_for_compare(folder: Path | str, ctx: Context) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return model.to(ctx.device).eval()


def zero_e2e(ctx: Context, stage: int) -> None:
    import torch

    mode = "cpu" if ctx.cpu else "gpu"
    steps, resume_to, every = ZERO_STEPS[mode]
    ctx.record("stage", stage)
    ctx.record("strategy", f"deepspeed_zero{stage}" + (" (CPU rank)" if ctx.cpu else ""))
    shape = ZERO_SHAPE_CPU if ctx.cpu else ZERO_SHAPE
    pretrained, run_dir = ctx.work / "pretrained", ctx.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    vocab = make_pretrained(pretrained, shape, tied=stage == 2, tokenizer_cache=ctx.work / "tok")
    ctx.record("model", {**shape, "vocab_size": vocab, "tie_word_embeddings": stage == 2})

    overrides = [
        f"hydra.run.dir={run_dir}",
        "experiment=tiny",
        "model=hf",
        f"model.pretrained={pretrained}",
        "model.produced_by=null",
        "model.gradient_checkpointing=true",
        f"paths.artifacts_dir={ctx.work / 'artifacts'}",
        f"paths.export_dir={run_dir / 'export'}",
        "data.source.n_train=512" if not ctx.cpu else "data.source.n_train=64",
        "data.source.n_val=32" if not ctx.cpu else "data.source.n_val=8",
        "data.seq_len=128" if not ctx.cpu else "data.seq_len=64",
        "data.batch_size=8" if not ctx.cpu else "data.batch_size=4",
        "diffusion.block_size=32",
        "optim.warmup_steps=2",
        f"trainer.val_check_interval={every}",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks=decode_eval",
        f"callbacks.decode_eval.every_n_steps={every}",
        "callbacks.decode_eval.limit=8" if not ctx.cpu else "callbacks.decode_eval.limit=4",
        "callbacks.decode_eval.batch_size=8"
        if not ctx.cpu
        else "callbacks.decode_eval.batch_size=4",
        "decode.max_new_tokens=32" if not ctx.cpu else "decode.max_new_tokens=16",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "logger=csv",
    ]
    overrides += strategy_overrides(ctx, stage)
    env = run_env(ctx)
    ckpt_dir = run_dir / "checkpoints"

    # 1. Train `steps` steps: checkpoints, validation and decode evals every `every` steps.
    started = time.monotonic()
    run_command(ctx, "train", ["-m", "src.train", *overrides, f"trainer.max_steps={steps}"], env)
    ctx.record("train_seconds", round(time.monotonic() - started, 2))
    if not (ckpt_dir / "last.ckpt").exists():
        raise RuntimeError(f"no {ckpt_dir}/last.ckpt after the first run")
    rows = csv_rows(run_dir, 0)
    losses = metric_series(rows, "train/loss")
    if not losses or not all(math.isfinite(v) for _, v in losses):
        raise RuntimeError(f"train/loss missing or not finite: {losses[:5]}")
    ctx.record("first_loss", losses[0][1])
    ctx.record("last_loss", losses[-1][1])
    ctx.record("val_loss", [v for _, v in metric_series(rows, "val/loss")])
    failed = metric_series(rows, "decode_eval/synthetic/failed")
    if failed:
        raise RuntimeError("the decode_eval callback failed (decode_eval/synthetic/failed=1)")
    decode = {
        key.split("/")[-1]: [v for _, v in metric_series(rows, key)]
        for key in (
            "decode_eval/synthetic/accuracy",
            "decode_eval/synthetic/tokens_per_forward",
            "decode_eval/synthetic/tokens_per_second",
            "decode_eval/seconds",
        )
    }
    if not decode["tokens_per_forward"] or min(decode["tokens_per_forward"]) <= 0:
        raise RuntimeError(f"decode_eval logged no tokens_per_forward: {decode}")
    ctx.record("decode_eval", decode)

    # 2. The same command with more steps in the same run dir resumes from last.ckpt.
    started = time.monotonic()
    output = run_command(
        ctx, "resume", ["-m", "src.train", *overrides, f"trainer.max_steps={resume_to}"], env
    )
    ctx.record("resume_seconds", round(time.monotonic() - started, 2))
    resumed_steps = [s for s, _ in metric_series(csv_rows(run_dir, 1), "train/loss")]
    resumed = bool(resumed_steps) and min(resumed_steps) >= steps - 1
    ctx.record(
        "resume",
        {
            "first_logged_step": min(resumed_steps, default=None),
            "restored_message": "Restoring states from the checkpoint" in output,
            "resumed": resumed,
        },
    )
    if not resumed:
        raise RuntimeError(f"the second run did not resume at step {steps}: {resumed_steps[:5]}")
    export = run_dir / "export"
    settings = json.loads((export / "diffusion.json").read_text())
    ctx.record("export_trained_steps", settings.get("trained_steps"))
    if settings.get("trained_steps") != resume_to:
        raise RuntimeError(f"export trained_steps={settings.get('trained_steps')} != {resume_to}")

    # 3. ZeRO checkpoint -> HF and the logits of both exports.
    probe = (torch.arange(128 if not ctx.cpu else 64) % (vocab - 1))[None].to(ctx.device)
    exported = load_for_compare(export, ctx)
    initial = load_for_compare(pretrained, ctx)
    moved = compare_logits(ctx, initial, exported, probe)["max_abs_logit_diff"]
    ctx.record("logits_moved_from_init", moved)
    converted = ctx.work / "export_from_zero"
    shutil.rmtree(converted, ignore_errors=True)
    started = time.monotonic()
    run_command(
        ctx,
        "zero_to_hf",
        ["-m", "src.zero_to_hf", str(ckpt_dir / "last.ckpt"), str(converted)],
        env,
    )
    ctx.record("zero_to_hf_seconds", round(time.monotonic() - started, 2))
    zero_settings = json.loads((converted / "diffusion.json").read_text())
    ctx.record("zero_to_hf_trained_steps", zero_settings.get("trained_steps"))
    comparison = compare_logits(ctx, exported, load_for_compare(converted, ctx), probe)
    ctx.record("export_vs_zero_to_hf", comparison)
    ctx.record("logits_atol", LOGITS_ATOL)
    if not comparison["within_atol"]:
        raise RuntimeError(
            f"logits differ by {comparison['max_abs_logit_diff']:.3g} > {LOGITS_ATOL}"
        )
    if moved <= LOGITS_ATOL:
        raise RuntimeError(f"training did not move the logits ({moved:.3g})")


def strategy_overrides(ctx: Context, stage: int) -> list[str]:
    """Lightning's DeepSpeedStrategy on one GPU (bf16), or on one CPU rank (fp32)."""
    device = (
        ["trainer.accelerator=cpu", "trainer.precision=32-true"] if ctx.cpu else ["trainer=gpu"]
    )
    overrides = [f"strategy=deepspeed_zero{stage}", *device, "trainer.devices=1"]
    if stage == 3:
        # Partition every tensor (the default keeps small ones whole on each rank).
        overrides.append(
            "trainer.strategy.config.zero_optimization.stage3_param_persistence_threshold=0"
        )
    return overrides


def run_env(ctx: Context) -> dict[str, str]:
    env = child_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if ctx.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# Steps, accumulation, checkpoint/decode-eval period and the batch (counted from 0 over the
# fit) at whose start SLURM's signal arrives: mid-window, so the checkpoint must wait for the
# window's end. bf16 on a GPU: two runs of the same steps differ by kernel non-determinism.
PREEMPT = {"gpu": (12, 4, 4, 21), "cpu": (4, 2, 2, 4)}
LOSS_ATOL = {"gpu": 2e-2, "cpu": 1e-4}


def zero3_preempt(ctx: Context) -> None:
    import torch

    mode = "cpu" if ctx.cpu else "gpu"
    steps, accumulate, every, signal_batch = PREEMPT[mode]
    boundary = signal_batch // accumulate + 1  # the step whose last micro-batch it comes in
    ctx.record("strategy", "deepspeed_zero3" + (" (CPU rank)" if ctx.cpu else ""))
    ctx.record(
        "setup",
        {"steps": steps, "accumulate": accumulate, "signal_batch": signal_batch, "every": every},
    )
    shape = ZERO_SHAPE_CPU if ctx.cpu else ZERO_SHAPE
    pretrained = ctx.work / "pretrained"
    vocab = make_pretrained(pretrained, shape, tied=False, tokenizer_cache=ctx.work / "tok")
    ctx.record("model", {**shape, "vocab_size": vocab, "tie_word_embeddings": False})

    def overrides(run_dir: Path) -> list[str]:
        return [
            f"hydra.run.dir={run_dir}",
            "experiment=tiny",
            "model=hf",
            f"model.pretrained={pretrained}",
            "model.produced_by=null",
            "model.gradient_checkpointing=true",
            f"paths.artifacts_dir={ctx.work / 'artifacts'}",
            f"paths.export_dir={run_dir / 'export'}",
            f"data.source.n_train={512 if not ctx.cpu else 64}",
            f"data.source.n_val={32 if not ctx.cpu else 8}",
            f"data.seq_len={128 if not ctx.cpu else 64}",
            f"data.batch_size={4 if not ctx.cpu else 2}",
            "diffusion.block_size=32",
            "optim.warmup_steps=2",
            f"trainer.max_steps={steps}",
            f"trainer.accumulate_grad_batches={accumulate}",
            f"trainer.val_check_interval={every}",
            "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1",
            "callbacks=decode_eval",
            f"callbacks.decode_eval.every_n_steps={every}",
            "callbacks.decode_eval.limit=4",
            "callbacks.decode_eval.batch_size=4",
            f"decode.max_new_tokens={32 if not ctx.cpu else 16}",
            f"callbacks.model_checkpoint.every_n_train_steps={every}",
            "logger=csv",
            *strategy_overrides(ctx, 3),
        ]

    env = run_env(ctx)
    straight, preempted = ctx.work / "straight", ctx.work / "preempted"
    for folder in (straight, preempted):
        shutil.rmtree(folder, ignore_errors=True)
    signal = [
        "+callbacks.signal_at._target_=tests.fixtures.callbacks.SignalAt",
        f"+callbacks.signal_at.batch={signal_batch}",
    ]
    seconds = {}
    for label, run_dir, extra in (
        ("straight", straight, []),
        ("preempted", preempted, signal),
        ("resumed", preempted, []),
    ):
        started = time.monotonic()
        output = run_command(ctx, label, ["-m", "src.train", *overrides(run_dir), *extra], env)
        seconds[label] = round(time.monotonic() - started, 2)
        if label == "preempted":
            written = re.search(r"preempted\.ckpt written at step (\d+)", output)
            ctx.record("preempted_at_step", int(written.group(1)) if written else None)
        if label == "resumed":
            ctx.record("restored_message", "Restoring states from the checkpoint" in output)
    ctx.record("seconds", seconds)
    reference = dict(metric_series(csv_rows(straight, 0), "train/loss"))
    first, second = (dict(metric_series(csv_rows(preempted, v), "train/loss")) for v in (0, 1))
    ctx.record("losses", {"straight": reference, "preempted": first, "resumed": second})
    resumed = {**first, **second}
    differences = [abs(resumed[s] - v) for s, v in reference.items() if s in resumed]
    curve = {
        "steps_straight": sorted(reference),
        "steps_preempted_then_resumed": sorted(first) + sorted(second),
        "max_abs_loss_diff": max(differences, default=None),
        "atol": LOSS_ATOL[mode],
    }
    curve["same_curve"] = (
        sorted(resumed) == sorted(reference) == list(range(steps))
        and curve["max_abs_loss_diff"] <= LOSS_ATOL[mode]
    )
    ctx.record("curve", curve)
    ckpt_dir = preempted / "checkpoints"
    kept = sorted(p.name for p in ckpt_dir.iterdir())
    ctx.record("checkpoints_kept", kept)
    ctx.record("last_ckpt_target", (ckpt_dir / "last.ckpt").resolve().name)
    decode = {
        key.split("/")[-1]: dict(metric_series(csv_rows(preempted, v), key))
        for v in (0, 1)
        for key in ("decode_eval/synthetic/num_scored", "decode_eval/synthetic/tokens_per_forward")
    }
    ctx.record("decode_eval", decode)

    # The end-of-fit HF export against the ZeRO-3 checkpoint converted (same dtype).
    converted = ctx.work / "export_from_zero"
    shutil.rmtree(converted, ignore_errors=True)
    dtype = "float32" if ctx.cpu else "bfloat16"
    started = time.monotonic()
    run_command(
        ctx,
        "zero_to_hf",
        ["-m", "src.zero_to_hf", str(ckpt_dir / "last.ckpt"), str(converted), "--dtype", dtype],
        env,
    )
    ctx.record("zero_to_hf_seconds", round(time.monotonic() - started, 2))
    from safetensors.torch import load_file

    trained = load_file(preempted / "export" / "model.safetensors")
    weights = load_file(converted / "model.safetensors")
    weight_diff = max(
        (weights[k].float() - v.float()).abs().max().item() for k, v in trained.items()
    )
    probe = (torch.arange(64) % (vocab - 1))[None].to(ctx.device)
    logits = compare_logits(
        ctx, load_for_compare(preempted / "export", ctx), load_for_compare(converted, ctx), probe
    )
    ctx.record("export_vs_zero_to_hf", {**logits, "max_abs_weight_diff": weight_diff})
    problems = []
    if ctx.report["results"]["preempted_at_step"] != boundary:
        problems.append(f"the preemption checkpoint is not at the step boundary {boundary}")
    if not curve["same_curve"]:
        problems.append(f"the resumed loss curve differs: {curve}")
    if kept != sorted(["last.ckpt", f"step{steps - every:06d}.ckpt", f"step{steps:06d}.ckpt"]):
        problems.append(f"retention kept {kept}")
    if weight_diff != 0:
        problems.append(f"zero_to_hf weights differ from the HF export by {weight_diff:.3g}")
    if problems:
        raise RuntimeError("; ".join(problems))
