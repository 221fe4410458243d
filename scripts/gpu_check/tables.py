"""Markdown tables of a results folder (`summary.json`'s `table_md`; `python
scripts/gpu_check.py --table DIR`), for the README of experiments/gpu_check/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_check import PARTS
from gpu_check.common import read_json
from gpu_check.decode import DECODE_MODES, VERIFIED_MODES


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def tables(out: Path) -> str:
    """Markdown tables of every part's JSON in `out`."""
    parts = {n: read_json(out / f"{n}.json") for n in PARTS}
    lines = ["## Status", ""]
    lines += _table(
        ["part", "status", "seconds", "timeout s", "error"],
        [
            [n, r.get("status"), r.get("seconds"), r.get("timeout_s"), (r.get("error") or "")[:120]]
            for n, r in parts.items()
            if r
        ],
    )
    any_report = next((r for r in parts.values() if r and r.get("device")), None)
    if any_report:
        device = any_report.get("device") or {}
        versions_line = ", ".join(f"{k} {v}" for k, v in any_report["versions"].items() if v)
        lines += [f"Device: {device.get('name', '-')}; {versions_line}.", ""]
    zero_rows = []
    for n in ("zero2_e2e",):
        r = (parts.get(n) or {}).get("results") or {}
        if not r:
            continue
        cmp = r.get("export_vs_zero_to_hf") or r.get("export_vs_checkpoint") or {}
        decode = r.get("decode_eval") or {}
        zero_rows.append(
            [
                r.get("strategy"),
                r.get("first_loss"),
                r.get("last_loss"),
                (decode.get("tokens_per_forward") or [None])[-1],
                (r.get("resume") or {}).get("resumed"),
                r.get("export_trained_steps"),
                "zero_to_hf" if "export_vs_zero_to_hf" in r else "checkpoint",
                cmp.get("max_abs_logit_diff"),
                r.get("logits_moved_from_init"),
                sum(r.get(k) or 0 for k in ("train_seconds", "resume_seconds")),
            ]
        )
    if zero_rows:
        lines += ["## Lightning end to end", ""]
        lines += _table(
            [
                "strategy",
                "first loss",
                "last loss",
                "decode tok/fwd",
                "resumed",
                "export steps",
                "export vs",
                "max abs dlogit",
                "moved from init",
                "train s",
            ],
            zero_rows,
        )
    cluster = (parts.get("zero3_e2e") or {}).get("results") or {}
    if cluster.get("curve"):
        setup, curve = cluster.get("setup") or {}, cluster["curve"]
        lines += ["## The cluster path: ZeRO-3, accumulation, preempted and resumed", ""]
        lines += _table(
            [
                "strategy",
                "steps x accumulation",
                "signal at batch",
                "checkpoint at step",
                "same curve",
                "max abs dloss",
                "kept",
                "zero_to_hf weight diff",
                "train s",
            ],
            [
                [
                    cluster.get("strategy"),
                    f"{setup.get('steps')} x {setup.get('accumulate')}",
                    setup.get("signal_batch"),
                    cluster.get("preempted_at_step"),
                    curve.get("same_curve"),
                    curve.get("max_abs_loss_diff"),
                    ", ".join(cluster.get("checkpoints_kept") or []),
                    (cluster.get("export_vs_zero_to_hf") or {}).get("max_abs_weight_diff"),
                    sum((cluster.get("seconds") or {}).values()),
                ]
            ],
        )
    evaluation = (parts.get("eval_torchrun") or {}).get("results") or {}
    if evaluation.get("compare"):
        compare = evaluation["compare"]
        lines += ["## src.eval under torchrun", ""]
        lines += _table(
            ["backend", "processes", "same metrics", "same samples", "tok/s one", "tok/s torchrun"],
            [
                [
                    evaluation.get("backend"),
                    evaluation.get("processes"),
                    all((compare.get("same") or {}).values()),
                    compare.get("samples_same"),
                    (evaluation.get("tokens_per_second") or {}).get("one"),
                    (evaluation.get("tokens_per_second") or {}).get("torchrun"),
                ]
            ],
        )
    step = (parts.get("train_step_7b") or {}).get("results") or {}
    if step.get("ar") or step.get("block_diffusion"):
        setup = step.get("setup", {})
        lines += [
            f"## Training step ({setup.get('shape')}, L = {setup.get('seq_len')}, "
            f"{setup.get('dtype')}, gradient checkpointing; forward + backward)",
            "",
        ]
        lines += _table(
            [
                "objective",
                "tokens through model",
                "s/step",
                "input tok/s",
                "peak GiB",
                "grad norm",
                "finite",
            ],
            [
                [
                    n,
                    r.get("tokens_through_model"),
                    r.get("seconds_per_step"),
                    r.get("input_tokens_per_second"),
                    r.get("peak_gib"),
                    r.get("grad_norm"),
                    r.get("grads_finite"),
                ]
                for n in ("ar", "block_diffusion")
                if (r := step.get(n))
            ],
        )
        ratio = step.get("block_diffusion_vs_ar") or {}
        lines += [
            f"Block diffusion / AR: time {fmt(ratio.get('time'))}, "
            f"peak memory {fmt(ratio.get('peak_memory'))}.",
            "",
        ]
    decode = (parts.get("decode") or {}).get("results") or {}
    decode_rows, verified_rows = [], []
    for label, per_shape in decode.items():
        if label == "setup" or not isinstance(per_shape, dict):
            continue
        for b in (1, 8):
            row = per_shape.get(f"batch_{b}")
            if not row:
                continue
            decode_rows.append(
                [
                    label,
                    b,
                    row.get("ms_per_denoising_forward"),
                    row["ar"]["ms_per_token"],
                    row["ar"]["tokens_per_second"],
                    *[row[m]["tokens_per_second"] for m in DECODE_MODES],
                    *[row[m]["tokens_per_denoising_step"] for m in DECODE_MODES],
                ]
            )
            verified_rows += [
                [label, b, mode, r["tokens_per_second"], r["tokens_per_forward"],
                 r["acceptance_length"], r["ms_per_forward"], r.get("same_as_ar")]
                for mode in VERIFIED_MODES
                if (r := row.get(mode))
            ]  # fmt: skip
    if decode_rows:
        lines += ["## Decoding (tokens/s over the batch)", ""]
        lines += _table(
            [
                "model",
                "batch",
                "ms/denoising fwd",
                "AR ms/tok",
                "AR tok/s",
                "tok/s @1",
                "tok/s @8",
                "tok/s @32",
                "tok/step @1",
                "tok/step @8",
                "tok/step @32",
            ],
            decode_rows,
        )
    if verified_rows:
        lines += ["## Self-verified decoding (decoder=verified, single-forward drafts)", ""]
        lines += _table(
            ["model", "batch", "mode", "tok/s", "tok/fwd", "tok/verify", "ms/fwd", "= HF"],
            verified_rows,
        )
    att = (parts.get("attention") or {}).get("results") or {}
    if att.get("sdpa"):
        lines += [f"## sdpa vs flex_attention ({(att.get('setup') or {}).get('timed')})", ""]
        lines += _table(
            ["backend", "first step s", "s/step", "peak GiB", "loss", "decode ms/fwd"],
            [
                [
                    n,
                    r.get("first_step_seconds"),
                    r.get("seconds_per_step"),
                    r.get("peak_gib"),
                    r.get("loss"),
                    (r.get("decode") or {}).get("ms_per_forward"),
                ]
                for n in ("sdpa", "flex_attention")
                if (r := att.get(n))
            ],
        )
        lines += [f"Max |logit difference| sdpa vs flex: {fmt(att.get('max_abs_logit_diff'))}.", ""]
    return "\n".join(lines)
