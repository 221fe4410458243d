"""The parts of the GPU check (`scripts/gpu_check.py` runs them; `scripts/README.md` says what
each measures). Each part is a function of a `Context`; heavy imports happen inside it."""

from __future__ import annotations

from gpu_check.attention import attention_part
from gpu_check.common import Part
from gpu_check.decode import decode_part
from gpu_check.eval_torchrun import eval_torchrun
from gpu_check.train_step import train_step_7b
from gpu_check.zero_e2e import zero3_preempt, zero_e2e

PARTS = {
    p.name: p
    for p in [
        Part("zero2_e2e", lambda ctx: zero_e2e(ctx, 2), {"gpu": 170, "cpu": 120}, parallel=True),
        # Three training runs (straight, preempted, resumed) and a conversion.
        Part("zero3_e2e", zero3_preempt, {"gpu": 240, "cpu": 200}, parallel=True),
        Part("eval_torchrun", eval_torchrun, {"gpu": 90, "cpu": 90}),
        Part("train_step_7b", train_step_7b, {"gpu": 65, "cpu": 60}),
        Part("decode", decode_part, {"gpu": 150, "cpu": 120}),
        Part("attention", attention_part, {"gpu": 140, "cpu": 90}),
    ]
}
