"""`python -m src.bench train`: the cost of a training step of each objective, side by side.

One batch, a training step (forward, backward, AdamW) of each objective — AR, block
diffusion as two [x_t; x_0] sequences (the official layout, 4L tokens for two views) and as
one shared clean stream [x_t1; x_t2; x_0] (3L), and with `diffusion.distill_weight` or
`diffusion.ar_weight` > 0 the run's recipe with its extra L-token forwards (the AR teacher's,
the AR term's) — timed in interleaved rounds so machine noise hits all of them alike.
Reports time per step, tokens/s (input tokens of the batch), the memory saved for backward
(activations; exact and device-independent) and, on CUDA, peak allocated memory, with ratios
to AR.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig

from src.config import ConfigError, instantiate
from src.diffusion import ar_loss, ar_term_from_clean_stream, block_diffusion_loss
from src.model import build_tokenizer, mask_token_id_of, model_from_config
from src.training.checks import check_train
from src.training.module import RECIPE_OPTIONS

# The recipe options that cost one more L-token forward per sample, and their table label.
EXTRA_FORWARDS = {"distill_weight": "distillation", "ar_weight": "AR term"}


@contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (activation memory)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def bench_train(cfg: DictConfig) -> list[dict[str, Any]]:
    """Time a training step of each objective on one batch of the run `cfg` configures."""
    steps, warmup = cfg.bench.steps, cfg.bench.warmup
    check_train(cfg)
    if not (isinstance(steps, int) and isinstance(warmup, int) and steps >= 1 and warmup >= 0):
        raise ConfigError(
            f"bench.steps={steps} / bench.warmup={warmup}: need steps >= 1, warmup >= 0"
        )
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in batch.items()}
    model = model_from_config(tokenizer, cfg.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    d = cfg.diffusion
    diffusion_kwargs = dict(
        mask_token_id=mask_token_id_of(tokenizer),
        block_size=d.block_size,
        eps=d.eps,
        complementary=d.complementary,
        token_shift=d.token_shift,
    )
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ar": lambda: ar_loss(model, batch["input_ids"], batch["labels"]),
        "block diffusion, two sequences (4L)": lambda: block_diffusion_loss(
            model,
            batch["input_ids"],
            batch["labels"],
            shared_clean_stream=False,
            **diffusion_kwargs,
        ),
        "block diffusion, shared stream (3L)": lambda: block_diffusion_loss(
            model, batch["input_ids"], batch["labels"], shared_clean_stream=True, **diffusion_kwargs
        ),
    }
    extras = [name for key, name in EXTRA_FORWARDS.items() if d.get(key, 0.0) > 0]
    if extras:
        # The run's recipe; SPEC 5.2's frozen AR teacher is the AR-init (no gradient).
        teacher = None
        if d.get("distill_weight", 0.0) > 0:
            teacher = model_from_config(tokenizer, cfg.model).to(device).eval()
            teacher.requires_grad_(False)
        recipe = {k: d[k] for k in RECIPE_OPTIONS if k in d}
        # SPEC 6's one-cache variant reads the AR term off the clean stream: no extra forward.
        one_forward_ar = ar_term_from_clean_stream(d)
        if one_forward_ar:
            extras[extras.index("AR term")] = "AR term, same pass"
        label = (
            f"shared stream + {' + '.join(extras)} (3L{' + L' * (len(extras) - one_forward_ar)})"
        )
        variants[label] = lambda: block_diffusion_loss(
            model,
            batch["input_ids"],
            batch["labels"],
            shared_clean_stream=True,
            teacher=teacher,
            **diffusion_kwargs,
            **recipe,
        )
    times: dict[str, list[float]] = {name: [] for name in variants}
    saved: dict[str, int] = {}
    peak: dict[str, float] = {}
    for step in range(warmup + steps):
        for name, loss_fn in variants.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with saved_tensor_bytes() as nbytes:
                loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
                peak[name] = torch.cuda.max_memory_allocated() / 2**20
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
            saved[name] = nbytes[0]
    tokens = batch["input_ids"].numel()
    ar_time = statistics.median(times["ar"])
    recipe_time = statistics.median(times["block diffusion, shared stream (3L)"])
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        rows.append(
            {
                "objective": name,
                "seconds_per_step": t,
                "tokens_per_second": tokens / t,
                "saved_for_backward_mib": saved[name] / 2**20,
                "cuda_peak_mib": peak.get(name),
                "step_vs_ar": t / ar_time,
                "step_vs_paper_recipe": t / recipe_time,
                "memory_vs_ar": saved[name] / saved["ar"],
            }
        )
    return rows


def print_train_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'objective':42} {'s/step':>8} {'tok/s':>9} {'saved MiB':>10} {'x AR time':>9} "
        f"{'x 3L time':>9} {'x AR mem':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['objective']:42} {r['seconds_per_step']:8.3f} {r['tokens_per_second']:9.0f} "
            f"{r['saved_for_backward_mib']:10.1f} {r['step_vs_ar']:9.2f} "
            f"{r['step_vs_paper_recipe']:9.2f} {r['memory_vs_ar']:9.2f}"
            + (f"  cuda peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] else "")
        )
