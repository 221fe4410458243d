"""Part `attention`: `sdpa` vs `flex_attention` on one model's weights: the same logits, the
training step's time and memory, decoding's ms per forward."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from typing import Any

from gpu_check.common import (
    TINY,
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
from gpu_check.decode import DECODE_MODES, diffusion_decode, random_prompts, stop_id_for


def attention_part(ctx: Context) -> None:
    import torch

    from src.diffusion import block_diffusion_logits

    shape = TINY if ctx.cpu else qwen_shape("1.5B")
    seq_len, block, steps = (64, 16, 2) if ctx.cpu else (2048, 32, 3)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    # FlexAttention has no backward on CPU (torch raises): the dry run times forwards only.
    backward = not ctx.cpu
    ctx.record(
        "setup",
        {
            "shape": "tiny" if ctx.cpu else "Qwen2.5-1.5B",
            "seq_len": seq_len,
            "block_size": block,
            "dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": True,
            "timed": "forward + backward" if backward else "forward only (no flex backward on CPU)",
            "flex_backward": "measured" if backward else "skipped: no CUDA",
        },
    )
    models = {"sdpa": random_model(shape, ctx.device, dtype, attn="sdpa")}
    models["flex_attention"] = random_model(shape, ctx.device, dtype, attn="flex_attention")
    models["flex_attention"].load_state_dict(models["sdpa"].state_dict())
    mask_id = mask_id_for(shape)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mask_id - 1, (1, seq_len), generator=generator).to(ctx.device)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    noisy = torch.where(
        torch.rand(1, 2, seq_len, generator=generator).to(ctx.device) < 0.5, mask_id, ids[:, None]
    )

    # Same weights, same input: the two backends must agree.
    with torch.no_grad():
        a = block_diffusion_logits(models["sdpa"].eval(), noisy, ids, block).float()
        b = block_diffusion_logits(models["flex_attention"].eval(), noisy, ids, block).float()
    diff = (a - b).abs().max().item()
    ctx.record("max_abs_logit_diff", diff)
    ctx.record("mean_abs_logit_diff", (a - b).abs().mean().item())
    ctx.record("logit_std", a.std().item())
    # fp32 on CPU: equal up to summation order. bf16 on CUDA: the kernels round differently at
    # every layer, so the bound is relative to the largest logit (a wrong mask moves logits by
    # about their own size).
    atol = 1e-4 if ctx.cpu else 0.05 * a.abs().max().item()
    ctx.record("logits_atol", atol)
    del a, b

    # Each measurement on its own: a failure of one backend still reports the other.
    rows: dict[str, dict[str, Any]] = {name: {} for name in models}
    errors = []
    for name, model in models.items():
        try:
            rows[name] |= attention_step(ctx, model, ids, labels, mask_id, block, steps, backward)
            ctx.log(f"{name}: {rows[name]['seconds_per_step']:.3f}s per step")
        except Exception as err:
            traceback.print_exc()
            errors.append(f"{name} training step: {type(err).__name__}: {err}")
        ctx.record(name, rows[name])
    # Decoding (cached, block-causal mask): ms per forward at one token per step, batch 1.
    # On CPU a prompt inside the first block leaves one attention shape (one flex compile).
    prompt_len, max_new = (16, 16) if ctx.cpu else (64, 32)
    prompts = random_prompts(shape, 1, prompt_len)
    for name, model in models.items():
        try:
            model.eval()
            with torch.no_grad():
                model.get_output_embeddings().weight[stop_id_for(shape)].zero_()
            mode = DECODE_MODES["1_per_forward"]
            warm = diffusion_decode(ctx, model, shape, prompts, max_new, **mode)  # compiles flex
            rows[name]["decode"] = diffusion_decode(ctx, model, shape, prompts, max_new, **mode)
            rows[name]["decode"]["first_call_seconds"] = warm["seconds"]
        except Exception as err:
            traceback.print_exc()
            errors.append(f"{name} decode: {type(err).__name__}: {err}")
        ctx.record(name, rows[name])
    sdpa, flex = rows["sdpa"], rows["flex_attention"]
    ratios = {}
    if "seconds_per_step" in sdpa and "seconds_per_step" in flex:
        ratios["step_time"] = flex["seconds_per_step"] / sdpa["seconds_per_step"]
        ctx.record("loss_diff", abs(sdpa["loss"] - flex["loss"]))
    if "decode" in sdpa and "decode" in flex:
        ratios["decode_ms_per_forward"] = (
            flex["decode"]["ms_per_forward"] / sdpa["decode"]["ms_per_forward"]
        )
    ctx.record("flex_vs_sdpa", ratios)
    if diff > atol:
        errors.append(f"sdpa and flex_attention logits differ by {diff:.3g} > {atol:.3g}")
    if backward and not all(r.get("grads_finite") for r in rows.values()):
        errors.append("non-finite (or missing) gradients")
    if errors:
        raise RuntimeError("; ".join(errors))


def attention_step(
    ctx: Context,
    model: Any,
    ids: Any,
    labels: Any,
    mask_id: int,
    block: int,
    steps: int,
    backward: bool,
) -> dict[str, Any]:
    """A block-diffusion training step (forward only without `backward`): the first one
    (compiling, for flex) and the median of `steps` more; the same noise every step."""
    import torch

    from src.diffusion import block_diffusion_loss

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    times, losses = [], []
    for _ in range(1 + steps):
        model.zero_grad(set_to_none=True)
        free(ctx.device)
        reset_peak(ctx.device)
        noise = torch.Generator(device=ctx.device).manual_seed(0)
        sync(ctx.device)
        t0 = time.perf_counter()
        with contextlib.nullcontext() if backward else torch.no_grad():
            loss = block_diffusion_loss(
                model, ids, labels, mask_token_id=mask_id, block_size=block, generator=noise
            )
            if backward:
                loss.backward()
        sync(ctx.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        del loss
    norm, finite = grad_stats(model) if backward else (None, None)
    row = {
        "first_step_seconds": times[0],  # includes compiling flex_attention
        "seconds_per_step": statistics.median(times[1:]),
        "peak_gib": peak_gib(ctx.device),
        "loss": losses[-1],
        "grad_norm": norm,
        "grads_finite": finite,
    }
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_disable()
    free(ctx.device)
    return row
