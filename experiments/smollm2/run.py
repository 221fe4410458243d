"""Study 2: does block-diffusion conversion preserve a real pretrained AR model?

    make smollm2-study                                  # distil, fine-tune, measure (CPU)
    .venv/bin/python -m experiments.smollm2.run --recipe bd_ar   # the best tiny recipe
    .venv/bin/python -m experiments.smollm2.run --summarise   # results.md from metrics/

Self-distillation on SmolLM2-135M-Instruct (`experiment=smollm2`):
1. prompts: everyday instructions from templates x topics (`PROMPT_TEMPLATES`), split into
   train and held-out by a stable hash of the prompt;
2. distil: the original model's greedy chat answers (HF `generate`, at most `MAX_NEW_TOKENS`).
   Answers the token limit cut off are dropped: they would teach the model to stop where the
   limit, not the model, stopped;
3. fine-tune: `python -m src.train experiment=smollm2_study/<recipe>` on the train answers
   into `runs/<recipe>/` (git-ignored; it resumes from its last checkpoint). Recipes are the
   config files of conf/experiment/smollm2_study/: `bd` (the paper's recipe), `bd_ar`
   (+ the AR term, the recipe study's best option) and `bd_ar_distill` (+ distillation from
   the original model);
4. measure on the held-out prompts, all decoders interleaved prompt by prompt in one process
   (batch 1, greedy): how often cached parallel decoding reproduces the original model's AR
   answer (exact, and token agreement), tokens per forward and tokens/s against the original's
   AR decoding; AR and block-diffusion perplexity of the held-out answers before and after.

Each step's JSON lands in `metrics/` (`distil.json`, then `<recipe>/train.json` and
`<recipe>/measure.json`; committed) and is skipped when present, so the study resumes;
`results.md` is built from `metrics/` alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from experiments.study import python
from src.config import compose
from src.data.jsonl import read_jsonl, write_jsonl
from src.data.sft import build_sft_dataset
from src.decoding import Decoder, DecodeSettings, GenerationResult, chat_prompt_ids, make_decoder
from src.diffusion import ar_loss, block_diffusion_loss
from src.model import (
    Export,
    build_tokenizer,
    load_export,
    mask_token_id_of,
    model_from_config,
    stop_token_of,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS, METRICS = HERE / "runs", HERE / "metrics"
# Every fine-tune (conf/experiment/smollm2_study/<recipe>.yaml) reads its chats from runs/data/.
RECIPES = {
    "bd": "paper's recipe",
    "bd_ar": "+ AR term, weight 0.5",
    "bd_ar_distill": "+ AR term 0.5 and distillation 0.5",
}
DATA = RUNS / "data"

PROMPT_TEMPLATES = (
    "Explain {topic} in one sentence.",
    "Give one interesting fact about {topic}.",
    "Write one short sentence about {topic}.",
    "In one sentence, why do people care about {topic}?",
    "Describe {topic} to a child in one sentence.",
    "Name three words related to {topic}.",
    "Write a two-line poem about {topic}.",
    "What is a common misconception about {topic}? Be brief.",
)
TOPICS = (
    "cats", "the moon", "coffee", "rain", "bicycles", "libraries", "volcanoes", "honey",
    "trains", "the ocean", "chess", "bread", "winter", "music", "trees", "elephants",
    "computers", "the sun", "gardens", "friendship", "mountains", "penguins", "tea", "books",
    "rivers", "clouds", "bees", "pizza", "football", "the internet", "dogs", "snow", "apples",
    "birds", "cities", "stars", "farming", "painting", "sleep", "exercise",
)  # fmt: skip
HELD_OUT_BUCKETS = 15  # of 100: the held-out share of the prompts
MAX_NEW_TOKENS = 64
DISTIL_BATCH = 16
# Threshold 1.0 (one token per forward) is left out: it costs ~3x the CPU time of 0.9.
THRESHOLDS = (0.9, 0.7)
SIDE_BY_SIDE = 4


def prompt_split() -> dict[str, list[str]]:
    """Every template x topic prompt, in train or held_out by a stable hash."""
    splits: dict[str, list[str]] = {"train": [], "held_out": []}
    for template in PROMPT_TEMPLATES:
        for topic in TOPICS:
            prompt = template.format(topic=topic)
            bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
            splits["held_out" if bucket < HELD_OUT_BUCKETS else "train"].append(prompt)
    return splits


def fine_tune_override(recipe: str) -> str:
    return f"experiment=smollm2_study/{recipe}"


def original_model() -> Export:
    """SmolLM2 exactly as the fine-tunes start training it (mask token row added)."""
    cfg = compose("train", [fine_tune_override("bd")])
    tokenizer = build_tokenizer(cfg.model)
    model = model_from_config(tokenizer, cfg.model).eval()
    settings = {
        "mask_token_id": mask_token_id_of(tokenizer),
        "stop_token_id": stop_token_of(tokenizer)[1],
        "block_size": cfg.diffusion.block_size,
    }
    return Export(model, tokenizer, settings)


def decoder(export: Export, name: str, threshold: float = 1.0) -> Decoder:
    """Greedy decoding of at most `MAX_NEW_TOKENS`, sub-block 8: `ar`, or `diffusion` at
    `threshold`."""
    decode = DecodeSettings.defaults() | {"sub_block_size": 8, "max_new_tokens": MAX_NEW_TOKENS}
    return make_decoder(export, decode | {"threshold": threshold}, decoder=name)


def user_prompt_ids(decoder: Decoder, prompt: str) -> list[int]:
    return chat_prompt_ids(decoder, [{"role": "user", "content": prompt}])


def distil() -> None:
    """The original model's greedy answers as chat jsonl (train / validation = held-out);
    the committed `distil.json` is kept when the (git-ignored) data are made again."""
    out = METRICS / "distil.json"
    if (DATA / "train.jsonl").exists() and (DATA / "validation.jsonl").exists():
        return
    ar = decoder(original_model(), "ar")
    tokenizer, stop = ar.tokenizer, ar.export.settings["stop_token_id"]
    report: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS, "splits": {}}
    started = time.perf_counter()
    for split, prompts in prompt_split().items():
        chats, cut = [], 0
        for start in range(0, len(prompts), DISTIL_BATCH):
            batch = prompts[start : start + DISTIL_BATCH]
            result = ar.generate([user_prompt_ids(ar, p) for p in batch])
            for prompt, tokens in zip(batch, result.tokens, strict=True):
                if not tokens or tokens[-1] != stop:
                    cut += 1
                    continue
                answer = tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip()
                chats.append(
                    {"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}]}
                )  # fmt: skip
        write_jsonl(DATA / f"{'validation' if split == 'held_out' else split}.jsonl", chats)
        report["splits"][split] = {"prompts": len(prompts), "kept": len(chats), "cut": cut}
    report["seconds"] = time.perf_counter() - started
    if not out.exists():
        write_json(out, report)
    elif json.loads(out.read_text())["splits"] != report["splits"]:
        print(f"warning: the distilled data differ from {out}'s: {report['splits']}", flush=True)


def export_dir(recipe: str) -> Path:
    return RUNS / recipe / "export"


def fine_tune(recipe: str) -> None:
    out = METRICS / recipe / "train.json"
    if out.exists():
        return
    started = time.perf_counter()
    export = export_dir(recipe)
    if not (export / "diffusion.json").exists():
        python("-m", "src.train", fine_tune_override(recipe), f"hydra.run.dir={export.parent}",
               f"paths.export_dir={export}")  # fmt: skip
    cfg = compose("train", [fine_tune_override(recipe)])
    write_json(out, {"steps": cfg.trainer.max_steps, "lr": cfg.optim.lr,
                     "batch_size": cfg.data.batch_size,
                     "ar_weight": cfg.diffusion.ar_weight,
                     "distill_weight": cfg.diffusion.distill_weight,
                     "minutes": (time.perf_counter() - started) / 60})  # fmt: skip


def held_out_losses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any]
) -> dict[str, float]:
    """AR and block-diffusion perplexity of the held-out answers (fixed noise, like val/loss)."""
    chats = read_jsonl(DATA / "validation.jsonl")
    b = settings["block_size"]
    data = build_sft_dataset(tokenizer, chats, 256, b, True, settings["mask_token_id"])
    data = data.with_format("torch")
    ar_sum = bd_sum = ar_tokens = bd_tokens = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for start in range(0, len(data), 4):
            batch = data[start : start + 4]
            ids, labels = batch["input_ids"], batch["labels"]
            n_ar = (labels[:, 1:] != -100).sum().item()
            n_bd = (labels != -100).sum().item()  # the losses' own normalisers
            ar_sum += ar_loss(model, ids, labels).item() * n_ar
            bd = block_diffusion_loss(
                model, ids, labels, mask_token_id=settings["mask_token_id"], block_size=b,
                generator=generator,
            )  # fmt: skip
            bd_sum += bd.item() * n_bd
            ar_tokens, bd_tokens = ar_tokens + n_ar, bd_tokens + n_bd
    return {
        "ar_perplexity": math.exp(ar_sum / ar_tokens),
        "bd_perplexity": math.exp(bd_sum / bd_tokens),
    }


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def agreement(reference: list[list[int]], decoded: list[list[int]]) -> dict[str, float]:
    """Exact match, positional token agreement and shared-prefix share vs `reference`."""
    pairs = list(zip(reference, decoded, strict=True))
    matches = sum(x == y for r, d in pairs for x, y in zip(r, d, strict=False))
    return {
        "exact": sum(r == d for r, d in pairs) / len(pairs),
        "token_agreement": matches / sum(len(r) for r in reference),
        "shared_prefix": sum(shared_prefix(r, d) / len(r) for r, d in pairs) / len(pairs),
    }


def measure(recipe: str, num_prompts: int) -> None:
    out = METRICS / recipe / "measure.json"
    if out.exists():
        return
    original = original_model()
    export = load_export(str(export_dir(recipe)))
    settings = original.settings
    assert export.settings["block_size"] == settings["block_size"]
    tokenizer, mask = original.tokenizer, settings["mask_token_id"]
    held_out = prompt_split()["held_out"][:num_prompts]
    decoders = {
        "original, AR": decoder(original, "ar"),
        "converted, AR (same weights)": decoder(export, "ar"),
        **{f"converted, parallel t={t}": decoder(export, "diffusion", t) for t in THRESHOLDS},
    }
    prompts = [user_prompt_ids(decoders["original, AR"], p) for p in held_out]
    results: dict[str, list[GenerationResult]] = {name: [] for name in decoders}
    for d in decoders.values():  # warm-up
        d.generate([prompts[0]])
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        names = list(decoders)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(decoders[name].generate([ids]))
        print(f"decoded held-out prompt {i + 1}/{len(prompts)}", flush=True)
    reference = [r.tokens[0] for r in results["original, AR"]]
    ar_speed = tokens_per_second(results["original, AR"])
    rows = []
    for name, runs in results.items():
        decoded = [r.tokens[0] for r in runs]
        assert all(mask not in d for d in decoded), "the mask token was emitted"
        forwards = sum(r.forwards for r in runs)
        rows.append(
            {"decoder": name, **agreement(reference, decoded),
             "tokens": sum(map(len, decoded)),
             "tokens_per_forward": sum(map(len, decoded)) / forwards,
             "tokens_per_second": tokens_per_second(runs),
             "speed_vs_original_ar": tokens_per_second(runs) / ar_speed}
        )  # fmt: skip
    side_by_side = [
        {"prompt": held_out[i],
         **{name: tokenizer.decode(results[name][i].tokens[0], skip_special_tokens=True)
            for name in ("original, AR", "converted, parallel t=0.9")}}
        for i in range(SIDE_BY_SIDE)
    ]  # fmt: skip
    report = {
        "held_out_prompts": len(prompts),
        "decode_seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "perplexity": {
            "before": held_out_losses(original.model, tokenizer, settings),
            "after": held_out_losses(export.model, export.tokenizer, settings),
        },
        "side_by_side": side_by_side,
    }
    write_json(out, report)


def tokens_per_second(runs: list[GenerationResult]) -> float:
    return sum(r.num_tokens for r in runs) / sum(r.seconds for r in runs)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def summarise() -> str:
    """results.md from metrics/: the paper recipe's run in full, then every recipe compared."""
    distilled = json.loads((METRICS / "distil.json").read_text())
    measured = {
        recipe: {name: json.loads((METRICS / recipe / f"{name}.json").read_text())
                 for name in ("train", "measure")}
        for recipe in RECIPES if (METRICS / recipe / "measure.json").exists()
    }  # fmt: skip
    m, train = measured["bd"]["measure"], measured["bd"]["train"]
    lines = ["# Results (generated by `run.py --summarise` from `metrics/`)", ""]
    lines.append(
        f"Distillation: {distilled['splits']['train']['kept']} train and "
        f"{distilled['splits']['held_out']['kept']} held-out answers kept "
        f"({distilled['splits']['train']['cut'] + distilled['splits']['held_out']['cut']} "
        f"answers longer than {distilled['max_new_tokens']} tokens dropped), "
        f"{distilled['seconds'] / 60:.1f} min. Fine-tune: {train['steps']} steps, "
        f"{train['minutes']:.1f} min, lr {train['lr']}, batch {train['batch_size']} x 256 tokens. "
        f"Decoding the held-out prompts below: {m['decode_seconds'] / 60:.1f} min "
        f"({m['threads']} threads)."
    )
    lines += ["", f"## Agreement with the original model's AR answers ({m['held_out_prompts']} "
              "held-out prompts, greedy, batch 1)", "", *agreement_table(m["rows"])]  # fmt: skip
    p = m["perplexity"]
    lines += ["", "## Held-out perplexity of the distilled answers", "",
              "| | before (original + mask row) | after fine-tune |", "|---|---|---|",
              f"| AR (causal, next token) | {p['before']['ar_perplexity']:.2f} "
              f"| {p['after']['ar_perplexity']:.2f} |",
              f"| block diffusion (masked tokens, fixed noise) | {p['before']['bd_perplexity']:.2f} "
              f"| {p['after']['bd_perplexity']:.2f} |", "", "## Side by side", ""]  # fmt: skip
    lines += side_by_side(m)
    if len(measured) > 1:
        lines += recipes_compared(measured)
    return "\n".join(lines)


def agreement_table(rows: list[dict[str, Any]]) -> list[str]:
    """The agreement rows as a table; a `recipe` column when the rows carry one."""
    recipe = "recipe" in rows[0]
    lines = [("| recipe " if recipe else "") + "| decoder | exact | token agreement "
             "| shared prefix | tokens/forward | tokens/s | x original AR |",
             "|---" * (7 + recipe) + "|"]  # fmt: skip
    for r in rows:
        lines.append(
            (f"| {r['recipe']} " if recipe else "")
            + f"| {r['decoder']} | {r['exact']:.3f} | {r['token_agreement']:.3f} "
            f"| {r['shared_prefix']:.3f} | {r['tokens_per_forward']:.2f} "
            f"| {r['tokens_per_second']:.1f} | {r['speed_vs_original_ar']:.2f} |"
        )
    return lines


def side_by_side(m: dict[str, Any]) -> list[str]:
    lines = []
    for s in m["side_by_side"]:
        lines += [f"**{s['prompt']}**", ""]
        lines += [f"- {k}: {v!r}" for k, v in s.items() if k != "prompt"]
        lines.append("")
    return lines


def recipes_compared(measured: dict[str, dict[str, Any]]) -> list[str]:
    """Every measured recipe's fine-tune, perplexity and agreement rows, one table each."""
    lines = ["## Recipes compared (same data, steps and held-out prompts)", "",
             "| recipe | fine-tune min | AR perplexity after | block-diffusion perplexity after |",
             "|---|---|---|---|"]  # fmt: skip
    for recipe, runs in measured.items():
        after = runs["measure"]["perplexity"]["after"]
        lines.append(
            f"| {recipe}: {RECIPES[recipe]} | {runs['train']['minutes']:.1f} "
            f"| {after['ar_perplexity']:.2f} | {after['bd_perplexity']:.2f} |"
        )
    rows = [
        {"recipe": recipe, **row}
        for recipe, runs in measured.items()
        for row in runs["measure"]["rows"]
    ]
    lines += ["", *agreement_table(rows), ""]
    for recipe, runs in list(measured.items())[1:]:
        lines += [f"### Side by side: {recipe}", "", *side_by_side(runs["measure"])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=list(RECIPES), default="bd", help="the fine-tune")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts to decode")
    parser.add_argument("--summarise", action="store_true", help="only rebuild results.md")
    args = parser.parse_args()
    if not args.summarise:
        distil()
        fine_tune(args.recipe)
        measure(args.recipe, args.prompts)
    (HERE / "results.md").write_text(summarise())
    print(f"wrote {HERE / 'results.md'}")


if __name__ == "__main__":
    main()
