"""Part `train_step_7b`: a 7B-shaped block-diffusion training step against an AR step."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from gpu_check.common import (
    TINY_UNTIED,
    Context,
    free,
    grad_stats,
    mask_id_for,
    peak_gib,
    qwen_shape,
    random_model,
    reset_peak,
    sync,
)


def train_step_7b(ctx: Context) -> None:
    import torch

    from src.diffusion import ar_loss, block_diffusion_loss

    shape = TINY_UNTIED if ctx.cpu else qwen_shape("7B")
    seq_len, block, warmup, steps = (64, 16, 1, 2) if ctx.cpu else (2048, 32, 1, 3)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    ctx.record(
        "setup",
        {
            "shape": "tiny" if ctx.cpu else "Qwen2.5-7B",
            "seq_len": seq_len,
            "block_size": block,
            "batch_size": 1,
            "dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": True,
            "attn_implementation": "sdpa",
            "measured": "forward + backward (no optimizer step: AdamW states of 7B in fp32 "
            "would need ~57 GiB more; gradients are kept, so the peak includes them)",
            "warmup_steps": warmup,
            "timed_steps": steps,
        },
    )
    started = time.monotonic()
    model = random_model(shape, ctx.device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sync(ctx.device)
    ctx.record("init_seconds", round(time.monotonic() - started, 2))
    ctx.record("parameters_billion", sum(p.numel() for p in model.parameters()) / 1e9)
    mask_id = mask_id_for(shape)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mask_id - 1, (1, seq_len), generator=generator).to(ctx.device)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100  # an unsupervised prompt
    variants = {
        "ar": (seq_len, lambda g: ar_loss(model, ids, labels)),
        "block_diffusion": (
            3 * seq_len,
            lambda g: block_diffusion_loss(
                model,
                ids,
                labels,
                mask_token_id=mask_id,
                block_size=block,
                shared_clean_stream=True,
                generator=g,
            ),
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows: dict[str, dict[str, Any]] = {}
    for step in range(warmup + steps):
        for name, (tokens, loss_fn) in variants.items():
            model.zero_grad(set_to_none=True)
            free(ctx.device)
            sync(ctx.device)
            static = torch.cuda.memory_allocated() / 2**30 if ctx.device == "cuda" else None
            reset_peak(ctx.device)
            noise = torch.Generator(device=ctx.device).manual_seed(step)
            t0 = time.perf_counter()
            loss = loss_fn(noise)
            loss.backward()
            sync(ctx.device)
            seconds = time.perf_counter() - t0
            if step >= warmup:
                times[name].append(seconds)
            norm, finite = grad_stats(model)
            rows[name] = {
                "tokens_through_model": tokens,
                "loss": loss.item(),
                "grad_norm": norm,
                "grads_finite": finite,
                "static_gib": static,
                "peak_gib": peak_gib(ctx.device),
                "first_step_seconds": rows.get(name, {}).get("first_step_seconds", seconds),
            }
            ctx.log(f"step {step} {name}: {seconds:.3f}s loss {loss.item():.3f}")
            del loss
    for name, row in rows.items():
        median = statistics.median(times[name])
        row["seconds_per_step"] = median
        row["all_seconds"] = times[name]
        row["input_tokens_per_second"] = seq_len / median
        ctx.record(name, row)
    ratio = {
        "time": rows["block_diffusion"]["seconds_per_step"] / rows["ar"]["seconds_per_step"],
    }
    if rows["ar"]["peak_gib"]:
        ratio["peak_memory"] = rows["block_diffusion"]["peak_gib"] / rows["ar"]["peak_gib"]
    ctx.record("block_diffusion_vs_ar", ratio)
    bad = [n for n, r in rows.items() if not (r["grads_finite"] and math.isfinite(r["loss"]))]
    if bad:
        raise RuntimeError(f"non-finite loss or gradients: {bad}")
