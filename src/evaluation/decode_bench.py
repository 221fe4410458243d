"""`python -m src.bench decode`: AR decoding vs cached parallel decoding, measured side by side.

The same prompts (the built-in synthetic test split, or a jsonl of {"messages", optional
"answer"} rows), greedy, through the AR baseline (greedy `generate_ar` on `ar_ckpt`, and on `ckpt`
itself as a same-weights speed check), cached parallel decoding of `ckpt` at each threshold x
sub-block cache off/on, and self-verified decoding of `ckpt` for each draft setting in
`verified_drafts` (`threshold` drafts at each threshold), at each batch size. Variants run
interleaved, chunk by chunk of prompts, so machine noise hits them alike. The report has
exact-match accuracy, tokens/s, tokens per forward (a batched forward counts once; forwards
of every kind), speedup vs the AR baseline at the same batch size, and for verified decoding
the tokens accepted per verification and the share of responses identical to `ckpt`'s own
AR decoding (1.0: SPEC 6's invariant held on every prompt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from src.config import ConfigError, as_lists
from src.config.files import check_output_file
from src.decoding import (
    Decoder,
    DecodeSettings,
    check_export,
    make_decoder,
    note_untrained_causal_mode,
)
from src.evaluation.benchmarks import get
from src.evaluation.runner import Evaluation, render_prompts, score_safely
from src.model import load_export, read_settings


@dataclass
class DecodeVariant:
    """One decoding setup and what it produced over the prompts (`cost`: summed over the
    batches, as `src.eval` sums them)."""

    name: str
    decoder: Decoder
    batch_size: int
    responses: list[str] = field(default_factory=list)
    cost: Evaluation = field(default_factory=Evaluation)

    def run(self, prompts: list[list[int]], record: bool = True) -> None:
        """Decode `prompts` in batches of `batch_size`; `record=False` is a warm-up."""
        for start in range(0, len(prompts), self.batch_size):
            result = self.decoder.generate(prompts[start : start + self.batch_size])
            if record:
                tokenizer = self.decoder.tokenizer
                self.responses += tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
                self.cost.add(result)


# Options that take a list of values, one variant each ([] allowed for verified_drafts only),
# with an example for the error that refuses [].
LIST_KEYS = {
    "thresholds": "[0.9]",
    "sub_block_cache": "[false]",
    "verified_drafts": "[single]",
    "batch_sizes": "[1]",
}


def check_options(cfg: DictConfig) -> DecodeSettings:
    """The decode settings of a `bench decode` config, every option checked before anything
    loads (each threshold must make valid settings); a scalar where a list is expected is
    made the one-element list, in `cfg`."""
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit={cfg.limit} must be >= 1 (or null for all prompts)")
    as_lists(cfg, LIST_KEYS, may_be_empty=("verified_drafts",))
    if cfg.threads < 1 or min(cfg.batch_sizes) < 1:
        raise ConfigError("batch_sizes (e.g. [1,8]) and threads must be >= 1")
    check_output_file("out", cfg.out)
    read_settings(cfg.ar_ckpt)
    decode = check_export(cfg.ckpt, cfg.decode, "diffusion")[1]
    for t in cfg.thresholds:
        decode.replace(threshold=t)
    if cfg.verified_drafts:
        check_export(cfg.ckpt, {**cfg.decode, "use_sub_block_cache": False}, "verified")
    for draft in cfg.verified_drafts:
        decode.replace(draft=draft)
    return decode.replace(temperature=0.0)  # greedy, like the AR baseline


def bench_decode(cfg: DictConfig) -> dict[str, Any]:
    """Run every variant over the prompts (interleaved) and return the JSON report."""
    decode = check_options(cfg)
    benchmark = get("synthetic", path=cfg.prompts)
    problems = benchmark.load(limit=cfg.limit)
    torch.set_num_threads(cfg.threads)
    load = {
        "device": cfg.device,
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
    }
    exports = {name: load_export(cfg[name], **load) for name in ("ckpt", "ar_ckpt")}
    variants = []
    for b in cfg.batch_sizes:
        variants += [
            DecodeVariant(
                f"ar (ar_ckpt) bs={b}", make_decoder(exports["ar_ckpt"], decode, decoder="ar"), b
            ),
            DecodeVariant(
                f"ar (ckpt) bs={b}", make_decoder(exports["ckpt"], decode, decoder="ar"), b
            ),
        ]
        variants += [
            DecodeVariant(
                f"diffusion t={t} cache={'on' if c else 'off'} bs={b}",
                make_decoder(
                    exports["ckpt"],
                    decode.replace(threshold=t, use_sub_block_cache=c),
                    decoder="diffusion",
                ),
                b,
            )
            for t in cfg.thresholds
            for c in cfg.sub_block_cache
        ]
        variants += [
            DecodeVariant(
                f"verified draft={d}{f' t={t}' if d == 'threshold' else ''} bs={b}",
                make_decoder(
                    exports["ckpt"],
                    decode.replace(threshold=t, draft=d, use_sub_block_cache=False),
                    decoder="verified",
                ),
                b,
            )
            for d in cfg.verified_drafts
            for t in (cfg.thresholds if d == "threshold" else cfg.thresholds[:1])
        ]
    prompts = {
        name: [
            export.tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in render_prompts(export.tokenizer, benchmark, problems)
        ]
        for name, export in exports.items()
    }

    def prompts_of(variant: DecodeVariant) -> list[list[int]]:
        return prompts["ckpt" if variant.decoder.export is exports["ckpt"] else "ar_ckpt"]

    chunk = max(cfg.batch_sizes)
    for variant in variants:
        variant.run(prompts_of(variant)[:chunk], record=False)
    for i, start in enumerate(range(0, len(problems), chunk)):
        # Rotate the order too, so no variant always runs right after the same neighbour.
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.run(prompts_of(variant)[start : start + chunk])

    rows = []
    for variant in variants:
        scores, _ = score_safely(benchmark, problems, variant.responses)
        is_ar = variant.decoder.name == "ar"
        cost = variant.cost
        note_untrained_causal_mode(variant.decoder, cost.acceptance_length)
        rows.append(
            {
                "variant": variant.name,
                "decoder": variant.decoder.name,
                "threshold": None if is_ar else variant.decoder.settings.threshold,
                "sub_block_cache": False if is_ar else variant.decoder.settings.use_sub_block_cache,
                "draft": variant.decoder.settings.draft
                if variant.decoder.name == "verified"
                else None,
                "batch_size": variant.batch_size,
                "accuracy": sum(scores) / len(scores),
                "tokens": cost.tokens,
                "forwards": cost.forwards,
                "forwards_by_kind": dict(cost.forwards_by_kind),
                "acceptance_length": cost.acceptance_length,
                "seconds": cost.seconds,
                "tokens_per_second": cost.tokens / cost.seconds,
                "tokens_per_forward": cost.tokens / cost.forwards,
            }
        )
    for variant, row in zip(variants, rows, strict=True):
        b = row["batch_size"]
        base = next(r for r in rows if r["variant"] == f"ar (ar_ckpt) bs={b}")
        row["speedup_vs_ar"] = row["tokens_per_second"] / base["tokens_per_second"]
        row["accuracy_vs_ar"] = row["accuracy"] - base["accuracy"]
        same_weights = next(v for v in variants if v.name == f"ar (ckpt) bs={b}").responses
        row["same_as_ar_ckpt"] = sum(
            a == r for a, r in zip(variant.responses, same_weights, strict=True)
        ) / len(same_weights)
    return {
        "ckpt": os.path.abspath(cfg.ckpt),
        "ar_ckpt": os.path.abspath(cfg.ar_ckpt),
        "prompts": cfg.prompts or "synthetic test split",
        "num_prompts": len(problems),
        "decode": decode.as_dict(),
        "threads": cfg.threads,
        "device": str(exports["ckpt"].model.device),
        "torch": torch.__version__,
        "rows": rows,
    }


def print_decode_table(report: dict[str, Any]) -> None:
    print(f"{report['num_prompts']} prompts ({report['prompts']}), decode {report['decode']}")
    header = (
        f"{'variant':40} {'acc':>6} {'d acc':>6} {'tok/s':>8} {'tok/fwd':>8} {'x AR':>6} "
        f"{'tokens':>7} {'fwds':>6} {'accept':>6} {'=AR':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        verified = r["decoder"] == "verified"
        print(
            f"{r['variant']:40} {r['accuracy']:6.3f} {r['accuracy_vs_ar']:+6.3f} "
            f"{r['tokens_per_second']:8.1f} {r['tokens_per_forward']:8.2f} "
            f"{r['speedup_vs_ar']:6.2f} {r['tokens']:7d} {r['forwards']:6d} "
            + (f"{r['acceptance_length']:6.2f} {r['same_as_ar_ckpt']:5.2f}" if verified else "")
        )
    print("accept: tokens per verification; =AR: share of responses identical to ckpt's AR ones")
