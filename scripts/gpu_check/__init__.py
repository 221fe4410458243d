"""The parts of the GPU check (`scripts/gpu_check.py` runs them; `scripts/README.md` says what
each measures). Each part is a function of a `Context`; heavy imports happen inside it."""

from __future__ import annotations

from gpu_check.attention import attention_part
from gpu_check.common import Part
from gpu_check.decode import decode_part
from gpu_check.train_step import train_step_7b
from gpu_check.zero_e2e import zero_e2e

PARTS = {
    p.name: p
    for p in [
        Part("zero2_e2e", lambda ctx: zero_e2e(ctx, 2), {"gpu": 170, "cpu": 120}, parallel=True),
        # The CPU dry run covers this flow once, in zero2_e2e (ddp in place of DeepSpeed).
        Part(
            "zero3_e2e",
            lambda ctx: zero_e2e(ctx, 3),
            {"gpu": 170, "cpu": 120},
            parallel=True,
            needs_cuda=True,
        ),
        Part("train_step_7b", train_step_7b, {"gpu": 65, "cpu": 60}),
        Part("decode", decode_part, {"gpu": 150, "cpu": 120}),
        Part("attention", attention_part, {"gpu": 140, "cpu": 90}),
    ]
}
