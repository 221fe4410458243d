"""Part `decode`: cached parallel decoding forced to 1, 8 and 32 tokens per denoising forward,
self-verified decoding with every draft rejected and with every draft accepted, and HF
`generate`, on 1.5B- and 7B-shaped random models at batch 1 and 8."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpu_check.common import (
    TINY,
    TINY_UNTIED,
    Context,
    free,
    mask_id_for,
    qwen_shape,
    random_model,
    sync,
)

# Forced tokens per denoising forward: threshold >= 1 unmasks one position per step;
# threshold 0 unmasks the whole sub-block (every confidence beats 0), so sub-block 8 gives 8
# and sub-block 32 (= the block) gives 32 (31 after a block's AR-predicted first token).
DECODE_MODES = {
    "1_per_forward": {"threshold": 1.0, "sub_block_size": 8},
    "8_per_forward": {"threshold": 0.0, "sub_block_size": 8},
    "32_per_forward": {"threshold": 0.0, "sub_block_size": 32},
}


# decoder=verified (SPEC 6) near both ends of its speed, single-forward drafts: a random
# model's drafts are mostly rejected (1-2 tokens per verification, a draft and a verify
# forward each), and with one token's logit raised everywhere the block-diffusion and causal
# argmax agree, so every draft is accepted (whole blocks per verification); two caches (the
# paper's block-causal context) and one (`diffusion.context=causal`).
VERIFIED_MODES = {
    "verified_random": {"context": "block_causal", "accept_all": False},
    "verified_accepted": {"context": "block_causal", "accept_all": True},
    "verified_one_cache_accepted": {"context": "causal", "accept_all": True},
}
FAVOURED_TOKEN = 0  # never the stop or the mask token


def prepare_decode_model(shape: dict[str, Any], ctx: Context, dtype: Any, attn: str) -> Any:
    """A random model whose stop token can never be the argmax (so every row decodes its
    whole budget): the stop token's output-embedding row is zero, so its logit is 0 while
    the largest of the other ~150k random logits is positive."""
    import torch

    model = random_model(shape, ctx.device, dtype, attn=attn).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[stop_id_for(shape)].zero_()
    return model


def stop_id_for(shape: dict[str, Any]) -> int:
    return mask_id_for(shape) - 1


def random_prompts(shape: dict[str, Any], batch: int, length: int, seed: int = 0) -> list:
    import torch

    generator = torch.Generator().manual_seed(seed)
    high = stop_id_for(shape) - 1
    return torch.randint(0, high, (batch, length), generator=generator).tolist()


def timed_decode(ctx: Context, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(ctx.device)
    t0 = time.perf_counter()
    result = fn()
    sync(ctx.device)
    return result, time.perf_counter() - t0


def diffusion_decode(
    ctx: Context, model: Any, shape: dict[str, Any], prompts: list, max_new: int, **mode: Any
) -> dict[str, Any]:
    from src.decoding import generate

    result, seconds = timed_decode(
        ctx,
        lambda: generate(
            model,
            prompts,
            mask_token_id=mask_id_for(shape),
            stop_token_id=stop_id_for(shape),
            block_size=32,
            max_new_tokens=max_new,
            **mode,
        ),
    )
    steps = [n for row in result.unmasked_per_step for n in row]
    return {
        "seconds": seconds,
        "forwards": result.forwards,
        "ms_per_forward": 1000 * seconds / result.forwards,
        "tokens": result.num_tokens,
        "all_tokens_generated": result.num_tokens == len(prompts) * max_new,
        "tokens_per_second": result.num_tokens / seconds,
        "tokens_per_forward": result.tokens_per_forward,
        "denoising_steps": len(steps),
        "tokens_per_denoising_step": sum(steps) / max(len(steps), 1),
        "max_unmasked_per_step": max(steps, default=0),
    }


def verified_decode(
    ctx: Context,
    model: Any,
    shape: dict[str, Any],
    prompts: list,
    max_new: int,
    *,
    context: str,
    accept_all: bool,
    reference: list | None = None,
) -> dict[str, Any]:
    """`generate_verified` timed; `reference`: the AR baseline's tokens for the same prompts (the
    share of rows it reproduces is recorded: 1.0 unless bf16 rounding flips a near-tie)."""
    import torch

    from src.decoding import generate_verified

    hook = None
    if accept_all:
        bias = torch.zeros(shape["vocab_size"], dtype=model.dtype, device=ctx.device)
        bias[FAVOURED_TOKEN] = 1e4
        hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias)
    try:
        result, seconds = timed_decode(
            ctx,
            lambda: generate_verified(
                model,
                prompts,
                mask_token_id=mask_id_for(shape),
                stop_token_id=stop_id_for(shape),
                block_size=32,
                sub_block_size=8,
                threshold=0.9,
                max_new_tokens=max_new,
                draft="single",
                context=context,
            ),
        )
    finally:
        if hook is not None:
            hook.remove()
    row = {
        "seconds": seconds,
        "forwards": result.forwards,
        "forwards_by_kind": result.forwards_by_kind,
        "ms_per_forward": 1000 * seconds / result.forwards,
        "tokens": result.num_tokens,
        "all_tokens_generated": result.num_tokens == len(prompts) * max_new,
        "tokens_per_second": result.num_tokens / seconds,
        "tokens_per_forward": result.tokens_per_forward,
        "acceptance_length": result.acceptance_length,
    }
    if reference is not None:
        same = sum(a == b for a, b in zip(result.tokens, reference, strict=True))
        row["same_as_ar"] = same / len(reference)
    return row


def ar_decode(
    ctx: Context, model: Any, shape: dict[str, Any], prompts: list, max_new: int
) -> tuple[dict[str, Any], list]:
    """The AR baseline (`generate_ar`, greedy over a KV cache) timed: its numbers, and its tokens."""
    from src.decoding import generate_ar

    result, seconds = timed_decode(
        ctx,
        lambda: generate_ar(
            model, prompts, stop_token_id=stop_id_for(shape), max_new_tokens=max_new
        ),
    )
    return result.tokens, {
        "seconds": seconds,
        "steps": result.forwards,
        "ms_per_token": 1000 * seconds / result.forwards,
        "tokens": result.num_tokens,
        "all_tokens_generated": result.num_tokens == len(prompts) * max_new,
        "tokens_per_second": result.num_tokens / seconds,
    }


def decode_part(ctx: Context) -> None:
    import torch

    shapes = (
        {"tiny-tied": TINY, "tiny-untied": TINY_UNTIED}
        if ctx.cpu
        else {"Qwen2.5-1.5B": qwen_shape("1.5B"), "Qwen2.5-7B": qwen_shape("7B")}
    )
    prompt_len, max_new = (32, 32) if ctx.cpu else (64, 128)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    ctx.record(
        "setup",
        {
            "dtype": str(dtype).removeprefix("torch."),
            "block_size": 32,
            "prompt_tokens": prompt_len,
            "max_new_tokens": max_new,
            "modes": DECODE_MODES,
            "attn_implementation": "sdpa",
            "timing": "wall clock around one call, CUDA synchronised, after a warm-up call",
        },
    )
    for label, shape in shapes.items():
        started = time.monotonic()
        model = prepare_decode_model(shape, ctx, dtype, "sdpa")
        init_seconds = time.monotonic() - started
        results: dict[str, Any] = {"init_seconds": round(init_seconds, 2)}
        for batch in (1, 8):
            prompts = random_prompts(shape, batch, prompt_len)
            # Warm-up: every kernel shape of the timed calls below, once.
            for mode in DECODE_MODES.values():
                diffusion_decode(ctx, model, shape, prompts, 32, **mode)
            for mode in VERIFIED_MODES.values():
                verified_decode(ctx, model, shape, prompts, 32, **mode)
            ar_decode(ctx, model, shape, prompts, 8)
            row: dict[str, Any] = {}
            for name, mode in DECODE_MODES.items():
                row[name] = diffusion_decode(ctx, model, shape, prompts, max_new, **mode)
                ctx.log(f"{label} batch {batch} {name}: {row[name]['tokens_per_second']:.0f} tok/s")
            reference, row["ar"] = ar_decode(ctx, model, shape, prompts, max_new)
            ctx.log(f"{label} batch {batch} AR: {row['ar']['ms_per_token']:.1f} ms/tok")
            for name, mode in VERIFIED_MODES.items():
                same = None if mode["accept_all"] else reference
                row[name] = verified_decode(
                    ctx, model, shape, prompts, max_new, **mode, reference=same
                )
                ctx.log(f"{label} batch {batch} {name}: {row[name]['tokens_per_second']:.0f} tok/s")
            row["ms_per_denoising_forward"] = row["1_per_forward"]["ms_per_forward"]
            results[f"batch_{batch}"] = row
            ctx.record(label, results)
        del model
        free(ctx.device)
    short = [
        f"{label} batch {b} {mode}"
        for label in shapes
        for b in (1, 8)
        for mode, r in ctx.report["results"][label][f"batch_{b}"].items()
        if isinstance(r, dict) and not r["all_tokens_generated"]
    ]
    if short:
        raise RuntimeError(f"stopped before max_new_tokens (stop token emitted): {short}")
    ones = [
        ctx.report["results"][label][f"batch_{b}"]["1_per_forward"]["max_unmasked_per_step"]
        for label in shapes
        for b in (1, 8)
    ]
    if any(n != 1 for n in ones):
        raise RuntimeError(f"threshold 1.0 unmasked more than one token per step: {ones}")
