"""Benchmarks: scripts that print measured numbers (never timed tests).

    python -m src.bench train                       # embedded default (experiment=tiny)
    python -m src.bench train experiment=smollm2 data.batch_size=2 bench.steps=3

`train`: one batch, a training step (forward, backward, AdamW) of each objective — AR, block
diffusion as two [x_t; x_0] sequences (the official layout, 4L tokens for two views) and as
one shared clean stream [x_t1; x_t2; x_0] (3L) — timed in interleaved rounds so machine
noise hits all three alike. Prints time per step, tokens/s (input tokens of the batch), the
memory saved for backward (activations; exact and device-independent) and, on CUDA, peak
allocated memory, with ratios to AR.

    python -m src.bench decode ckpt=artifacts/tiny ar_ckpt=artifacts/tiny_ar_ft
    python -m src.bench decode ckpt=<export> ar_ckpt=<export> prompts=chats.jsonl limit=20 \
        thresholds=0.9 sub_block_cache=false batch_sizes=1 decode.sub_block_size=4 out=b.json

`decode`: the same prompts (the built-in synthetic test split, or a jsonl of {"messages",
optional "answer"} rows), greedy, through the AR baseline (HF `generate` on `ar_ckpt`, and on
`ckpt` itself as a same-weights speed check) and cached parallel decoding of `ckpt` at each
threshold x sub-block cache off/on x batch size. Variants run interleaved, chunk by chunk of
prompts, so machine noise hits them alike. Prints exact-match accuracy, tokens/s, tokens per
forward (a batched forward counts once) and speedup vs the AR baseline at the same batch size;
writes the table as JSON to `out` (default ./bench_decode.json).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.benchmarks import get
from src.config import GENERATE_KEYS, resolve_decode, validate_train
from src.decoding import GenerationResult, generate, generate_ar
from src.diffusion import ar_loss, block_diffusion_loss
from src.evaluation import render_prompts, score_safely
from src.export import Export, load_export, read_settings
from src.model import MASK_TOKEN, build_model
from src.train import build_tokenizer

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_train(overrides: list[str]) -> DictConfig:
    """The training config exactly as `python -m src.train <overrides>` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} paths
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@contextmanager
def saved_tensor_bytes() -> Any:
    """Count the bytes autograd saves for backward inside the block (activation memory)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def bench_train(overrides: list[str], steps: int = 5, warmup: int = 1) -> list[dict[str, Any]]:
    cfg = compose_train(overrides)
    validate_train(cfg)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device) for k, v in batch.items()}
    build = {k: cfg.model[k] for k in ("pretrained", "config", "gguf_file", "attn_implementation")}
    model = build_model(tokenizer, **build).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    d = cfg.diffusion
    diffusion_kwargs = dict(
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN),
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
                "memory_vs_ar": saved[name] / saved["ar"],
            }
        )
    return rows


def print_train_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'objective':38} {'s/step':>8} {'tok/s':>9} {'saved MiB':>10} {'x AR time':>9} {'x AR mem':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['objective']:38} {r['seconds_per_step']:8.3f} {r['tokens_per_second']:9.0f} "
            f"{r['saved_for_backward_mib']:10.1f} {r['step_vs_ar']:9.2f} {r['memory_vs_ar']:9.2f}"
            + (f"  cuda peak {r['cuda_peak_mib']:.0f} MiB" if r["cuda_peak_mib"] else "")
        )


# Options of `bench decode`, with their defaults; `decode.<key>=...` overrides conf/decode.
DECODE_OPTIONS: dict[str, str | None] = {
    "ckpt": None,
    "ar_ckpt": None,
    "prompts": None,
    "limit": "64",
    "thresholds": "1.0,0.9,0.7,0.5",
    "sub_block_cache": "false,true",
    "batch_sizes": "1,8",
    "threads": "1",
    "out": "bench_decode.json",
}
_BOOLS = {"true": True, "false": False}


@dataclass
class DecodeVariant:
    """One decoding setup of `bench decode` and what it produced over the prompts."""

    name: str
    export: Export
    batch_size: int
    threshold: float | None = None  # None: AR decoding (HF generate)
    sub_block_cache: bool = False
    responses: list[str] = field(default_factory=list)
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0

    def decode(self, prompts: list[list[int]], decode: dict[str, Any]) -> GenerationResult:
        settings, model = self.export.settings, self.export.model
        if self.threshold is None:
            return generate_ar(
                model,
                prompts,
                stop_token_id=settings["stop_token_id"],
                max_new_tokens=decode["max_new_tokens"],
            )
        kwargs = {k: decode[k] for k in GENERATE_KEYS} | {
            "threshold": self.threshold,
            "use_sub_block_cache": self.sub_block_cache,
            "temperature": 0.0,  # greedy, like the AR baseline
        }
        return generate(
            model,
            prompts,
            mask_token_id=settings["mask_token_id"],
            stop_token_id=settings["stop_token_id"],
            **kwargs,
        )

    def run(self, prompts: list[list[int]], decode: dict[str, Any], record: bool = True) -> None:
        """Decode `prompts` in batches of `batch_size`; `record=False` is a warm-up."""
        for start in range(0, len(prompts), self.batch_size):
            result = self.decode(prompts[start : start + self.batch_size], decode)
            if record:
                tokenizer = self.export.tokenizer
                self.responses += tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
                self.tokens += result.num_tokens
                self.forwards += result.forwards
                self.seconds += result.seconds


def parse_decode_options(argv: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`key=value` arguments -> (bench options, decode overrides); one-line errors."""
    options, overrides = dict(DECODE_OPTIONS), {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r} is not key=value")
        if key.startswith("decode."):
            overrides[key.removeprefix("decode.")] = value
        elif key in options:
            options[key] = value
        else:
            raise ValueError(f"unknown option {key!r}: use one of {', '.join(DECODE_OPTIONS)}")
    for key in ("ckpt", "ar_ckpt"):
        if options[key] is None:
            raise ValueError(f"pass {key}=<export dir>")
    try:
        parsed = {
            **options,
            "limit": None if options["limit"] == "null" else int(options["limit"]),
            "thresholds": [float(t) for t in options["thresholds"].split(",")],
            "sub_block_cache": [_BOOLS[c.lower()] for c in options["sub_block_cache"].split(",")],
            "batch_sizes": [int(b) for b in options["batch_sizes"].split(",")],
            "threads": int(options["threads"]),
        }
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"bad bench option ({err}): e.g. limit=64 thresholds=1.0,0.9 "
            "sub_block_cache=false,true batch_sizes=1,8 threads=1"
        ) from None
    if min(parsed["batch_sizes"]) < 1 or parsed["threads"] < 1:
        raise ValueError("batch_sizes and threads must be >= 1")
    return parsed, overrides


def decode_config(overrides: dict[str, str], trained_block_size: int) -> dict[str, Any]:
    """conf/decode/default.yaml with `decode.*` overrides, block size from the export."""
    decode = OmegaConf.load(Path(CONF_DIR) / "decode" / "default.yaml")
    decode.block_size = None
    decode.merge_with_dotlist([f"{k}={v}" for k, v in overrides.items()])
    return resolve_decode(decode, trained_block_size)


def bench_decode(options: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Run every variant over the prompts (interleaved) and return the JSON report.

    `options` and decode `overrides` as `parse_decode_options` returns them.
    """
    settings = read_settings(options["ckpt"])
    read_settings(options["ar_ckpt"])
    if settings.get("mask_token_id") is None:
        raise ValueError(f"ckpt={options['ckpt']} has no mask token: pass a block-diffusion export")
    decode = decode_config(overrides, settings["block_size"])
    benchmark = get("synthetic", path=options["prompts"])
    problems = benchmark.load(limit=options["limit"])
    torch.set_num_threads(options["threads"])
    exports = {name: load_export(options[name]) for name in ("ckpt", "ar_ckpt")}
    variants = []
    for b in options["batch_sizes"]:
        variants += [
            DecodeVariant(f"ar (ar_ckpt) bs={b}", exports["ar_ckpt"], b),
            DecodeVariant(f"ar (ckpt) bs={b}", exports["ckpt"], b),
        ]
        variants += [
            DecodeVariant(
                f"diffusion t={t} cache={'on' if c else 'off'} bs={b}", exports["ckpt"], b, t, c
            )
            for t in options["thresholds"]
            for c in options["sub_block_cache"]
        ]
    prompts = {
        name: [
            export.tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in render_prompts(export.tokenizer, benchmark, problems)
        ]
        for name, export in exports.items()
    }

    def prompts_of(variant: DecodeVariant) -> list[list[int]]:
        return prompts["ckpt" if variant.export is exports["ckpt"] else "ar_ckpt"]

    chunk = max(options["batch_sizes"])
    for variant in variants:
        variant.run(prompts_of(variant)[:chunk], decode, record=False)
    for i, start in enumerate(range(0, len(problems), chunk)):
        # Rotate the order too, so no variant always runs right after the same neighbour.
        shift = i % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.run(prompts_of(variant)[start : start + chunk], decode)

    rows = []
    for variant in variants:
        scores, _ = score_safely(benchmark, problems, variant.responses)
        rows.append(
            {
                "variant": variant.name,
                "decoder": "ar" if variant.threshold is None else "diffusion",
                "threshold": variant.threshold,
                "sub_block_cache": variant.sub_block_cache,
                "batch_size": variant.batch_size,
                "accuracy": sum(scores) / len(scores),
                "tokens": variant.tokens,
                "forwards": variant.forwards,
                "seconds": variant.seconds,
                "tokens_per_second": variant.tokens / variant.seconds,
                "tokens_per_forward": variant.tokens / variant.forwards,
            }
        )
    for row in rows:
        base = next(r for r in rows if r["variant"] == f"ar (ar_ckpt) bs={row['batch_size']}")
        row["speedup_vs_ar"] = row["tokens_per_second"] / base["tokens_per_second"]
        row["accuracy_vs_ar"] = row["accuracy"] - base["accuracy"]
    return {
        "ckpt": os.path.abspath(options["ckpt"]),
        "ar_ckpt": os.path.abspath(options["ar_ckpt"]),
        "prompts": options["prompts"] or "synthetic test split",
        "num_prompts": len(problems),
        "decode": decode,
        "threads": options["threads"],
        "device": str(exports["ckpt"].model.device),
        "torch": torch.__version__,
        "rows": rows,
    }


def print_decode_table(report: dict[str, Any]) -> None:
    print(f"{report['num_prompts']} prompts ({report['prompts']}), decode {report['decode']}")
    header = (
        f"{'variant':34} {'acc':>6} {'d acc':>6} {'tok/s':>8} {'tok/fwd':>8} {'x AR':>6} "
        f"{'tokens':>7} {'fwds':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        print(
            f"{r['variant']:34} {r['accuracy']:6.3f} {r['accuracy_vs_ar']:+6.3f} "
            f"{r['tokens_per_second']:8.1f} {r['tokens_per_forward']:8.2f} "
            f"{r['speedup_vs_ar']:6.2f} {r['tokens']:7d} {r['forwards']:6d}"
        )


def main(argv: list[str]) -> None:
    usage = (
        "usage: python -m src.bench train [hydra overrides] [bench.steps=N]\n"
        "       python -m src.bench decode ckpt=<export> ar_ckpt=<AR export> [options]"
    )
    if not argv or argv[0] not in ("train", "decode"):
        raise SystemExit(usage)
    if argv[0] == "decode":
        try:
            options, overrides = parse_decode_options(argv[1:])
            report = bench_decode(options, overrides)
        except ValueError as err:  # bad options: one line, before any decoding
            raise SystemExit(f"error: {err}") from None
        print_decode_table(report)
        with open(options["out"], "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {options['out']}")
        return
    overrides = [a for a in argv[1:] if not a.startswith("bench.")]
    options = dict(
        a.removeprefix("bench.").split("=", 1) for a in argv[1:] if a.startswith("bench.")
    )
    rows = bench_train(overrides, steps=int(options.get("steps", 5)))
    print_train_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
