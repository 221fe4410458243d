"""Recipe study: options beyond the paper (SPEC section 5, and the AR term) against the paper's.

    .venv/bin/python -m experiments.recipe.run --seeds 0 1 2
    .venv/bin/python -m experiments.recipe.run --seeds 1 2 --runs paper ar05
    .venv/bin/python -m experiments.recipe.run --summarise      # results.md from metrics/

Every run is `python -m src.train experiment=recipe/<name> seed=<k>` (conf/experiment/recipe/:
the paper's recipe, position-dependent masking at two tilts and with a resampled second view,
distillation at two weights, the AR term at two weights, combinations, and the AR fine-tune),
900 steps from the same AR-init (`artifacts/tiny_ar`), into `runs/<name>/seed<k>/`
(git-ignored). Measured on all 200 test problems, sub-block 8: exact match at threshold 0.9
and 1.0 (`src.eval`, batch 8, per task family, tokens per step; the wrong answers are kept in
`metrics/wrong/`, and `errors.py` names where each arithmetic one first goes wrong), the
teacher-forced arithmetic probe per step (`experiments/tiny_repro/probe_arithmetic.py`),
AR-relative tokens/s side by side in one process (`src.bench decode`, batch 1, against the AR
fine-tune of the same seed), the train-step cost of the options with an extra forward
(`src.bench train`), and seed 0's answers to a few prompts in and outside the corpus
(`ANSWER_PROMPTS`) from the paper's recipe, the best option and the AR fine-tune. Cheapest and
most central first: every run of seed 0, then the other seeds; a measurement whose JSON is in
`metrics/` is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.recipe.errors import KINDS, first_error
from experiments.study import Study, main, mean, mean_spread, python
from src.data.jsonl import read_jsonl, write_jsonl
from src.data.synthetic import TASKS
from src.decoding import Chat, DecodeSettings, load_decoder

HERE = Path(__file__).resolve().parent
STUDY = Study(HERE, "recipe")
METRICS = STUDY.metrics
RUNS = {
    "paper": "paper's recipe (uniform masking, complementary views)",
    "tilt05": "+ position-dependent masking, tilt 0.5",
    "tilt10": "+ position-dependent masking, tilt 1.0",
    "tilt10_resample": "+ position-dependent, tilt 1.0, second view resampled",
    "distill05": "+ distillation, weight 0.5",
    "distill10": "+ distillation, weight 1.0",
    "combo": "+ tilt 1.0 and distillation 1.0",
    "ar05": "+ AR term on x_0, weight 0.5",
    "ar10": "+ AR term on x_0, weight 1.0",
    "ar05_tilt05": "+ AR term 0.5 and tilt 0.5",
    "ar05_tilt10": "+ AR term 0.5 and tilt 1.0",
    "ar05_distill05": "+ AR term 0.5 and distillation 0.5",
}
THRESHOLDS = (0.9, 1.0)
# The train bench of each option with an extra forward (its row beside AR, 4L and 3L).
STEP_COSTS = {"distill10": METRICS / "step_cost.json", "ar05": METRICS / "step_cost_ar05.json"}
SUB_BLOCK = "decode.sub_block_size=8"
# Seed 0's answers side by side: the paper's recipe, the option with the best mean exact match
# over three seeds (results.md), the AR fine-tune. The first two prompts are in the corpus's
# distribution, the others are not (three or six digits, two terms, a question).
ANSWERS_FROM = ("paper", "ar05", "ar_ft")
ANSWER_PROMPTS = ("Sort: 7 2 9 4 1", "Compute 4 + 3 - 5 + 2", "Sort: 5 2 9", "Sort: 9 3 7 1 5 8",
                  "Compute 4 + 3", "Reverse: 1 2 3", "What is the capital of France?")  # fmt: skip


def measure(name: str, seed: int) -> None:
    """The evaluations, probe and decode bench of one fine-tune, each once."""
    for t in THRESHOLDS:
        out = METRICS / "eval" / f"{name}_t{t}_seed{seed}.json"
        if not out.exists():
            STUDY.evaluate(STUDY.fine_tune(name, seed), out, SUB_BLOCK, f"decode.threshold={t}")
        wrong = METRICS / "wrong" / f"{out.stem}.jsonl"  # the few wrong answers, to read
        if not wrong.exists():
            samples = read_jsonl(STUDY.eval_dir(out) / "samples.jsonl")
            write_jsonl(wrong, [s for s in samples if not s["score"]])
    probe = METRICS / "probe" / f"{name}_seed{seed}.json"
    if not probe.exists():
        python("-m", "experiments.tiny_repro.probe_arithmetic", str(STUDY.fine_tune(name, seed)),
               f"--out={probe}")  # fmt: skip
    bench = METRICS / "bench" / f"{name}_seed{seed}.json"
    if not bench.exists():
        bench.parent.mkdir(parents=True, exist_ok=True)
        python("-m", "src.bench", "decode", f"ckpt={STUDY.fine_tune(name, seed)}",
               f"ar_ckpt={STUDY.fine_tune('ar_ft', seed)}", f"out={bench}", "thresholds=[0.9]",
               "sub_block_cache=[false]", "batch_sizes=[1]", "limit=null", SUB_BLOCK)  # fmt: skip


def run(seeds: list[int], runs: list[str] | None = None) -> None:
    for name, step_cost in STEP_COSTS.items():
        if not step_cost.exists():
            step_cost.parent.mkdir(parents=True, exist_ok=True)
            python("-m", "src.bench", "train", f"experiment=recipe/{name}", "bench.steps=5",
                   f"bench.out={step_cost}")  # fmt: skip
    for seed in seeds:
        ar_eval = METRICS / "eval" / f"ar_ft_seed{seed}.json"
        if not ar_eval.exists():
            STUDY.evaluate(STUDY.fine_tune("ar_ft", seed), ar_eval, "decoder=ar")
        for name in runs or RUNS:
            measure(name, seed)
    if 0 in seeds:
        answers()


def answers() -> None:
    """`ANSWER_PROMPTS` decoded greedily by seed 0 of each run in `ANSWERS_FROM`."""
    out = METRICS / "answers.json"
    if out.exists():
        return
    rows = []
    for name in ANSWERS_FROM:
        decode = DecodeSettings.defaults() | {"sub_block_size": 8, "threshold": 0.9}
        decoder = load_decoder(str(STUDY.fine_tune(name, 0)), decode, device="cpu")
        for prompt in ANSWER_PROMPTS:
            text, result = Chat(decoder).reply(prompt)  # a fresh conversation per prompt
            rows.append({"run": name, "prompt": prompt, "answer": text,
                         "tokens_per_forward": result.tokens_per_forward})  # fmt: skip
    out.write_text(
        json.dumps({"threshold": 0.9, "sub_block_size": 8, "rows": rows}, indent=2) + "\n"
    )


def summarise() -> str:
    """results.md from the JSON files under metrics/."""
    lines = ["# Results (generated by `run.py --summarise` from `metrics/`)", "",
             "All 200 test problems, sub-block 8, 900 steps from the same AR-init; mean ± sample "
             "std over the seeds measured (n).", "",
             "| recipe | exact match, t=0.9 | arithmetic, t=0.9 | tokens/step, t=0.9 "
             "| exact match, t=1.0 | x AR-FT tokens/s (t=0.9, batch 1) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    ar = STUDY.load("eval/ar_ft_seed*.json")
    lines.append(
        f"| AR fine-tune, AR decoding | {mean_spread([m['accuracy'] for m in ar])} "
        f"| {mean_spread([m['by_task']['arithmetic'] for m in ar])} | 1.00 | | 1.00 |"
    )
    for name, label in RUNS.items():
        t09, t10 = (STUDY.load(f"eval/{name}_t{t}_seed*.json") for t in THRESHOLDS)
        speed = [
            next(r for r in b["rows"] if r["decoder"] == "diffusion")["speedup_vs_ar"]
            for b in STUDY.load(f"bench/{name}_seed*.json")
        ]
        lines.append(
            f"| {label} | {mean_spread([m['accuracy'] for m in t09])} "
            f"| {mean_spread([m['by_task']['arithmetic'] for m in t09])} "
            f"| {mean([m['unmasked_per_step'] for m in t09], 2)} "
            f"| {mean_spread([m['accuracy'] for m in t10])} | {mean_spread(speed)} |"
        )
    lines += ["", "## Per task family (exact match, t=0.9)", "",
              "| recipe | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]  # fmt: skip
    for name, label in RUNS.items():
        ms = STUDY.load(f"eval/{name}_t0.9_seed*.json")
        cells = [mean_spread([m["by_task"][task] for m in ms]) for task in TASKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Arithmetic steps, teacher-forced (`probe_arithmetic.py`: left to right, "
              "accuracy of step 1 / 2 / 3's result)", "", "| recipe | step 1 | step 2 | step 3 |",
              "|---|---|---|---|"]  # fmt: skip
    for name, label in RUNS.items():
        probes = [
            p["accuracy_by_step"]["left to right"] for p in STUDY.load(f"probe/{name}_seed*.json")
        ]
        cells = [mean_spread([p[k] for p in probes]) for k in range(3)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the wrong arithmetic answers first go wrong (`errors.py`; t=0.9, "
              "summed over the seeds; 50 arithmetic problems per seed)", "",
              "| recipe | seeds | wrong | " + " | ".join(KINDS) + " |",
              "|---|---|---|" + "---|" * len(KINDS)]  # fmt: skip
    for name, label in RUNS.items():
        files = sorted(METRICS.glob(f"wrong/{name}_t0.9_seed*.jsonl"))
        kinds = [
            first_error(s["prompt"], s["response"])
            for wrong in files
            for s in read_jsonl(wrong)
            if s["task"] == "arithmetic"
        ]
        counts = " | ".join(str(kinds.count(k)) for k in KINDS)
        lines.append(f"| {label} | {len(files)} | {len(kinds)} | {counts} |")
    # One row per objective, the first bench's where several measured it; every ratio is to
    # the AR and 3L steps of the same bench run.
    rows = {
        r["objective"]: r for cost in reversed(STUDY.load("step_cost*.json")) for r in cost["rows"]
    }
    if rows:
        lines += ["", "## Train-step cost (`src.bench train`, one process per option, interleaved)",
                  "", "| objective | s/step | x AR | x paper recipe (3L) |", "|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['objective']} | {r['seconds_per_step']:.3f} | {r['step_vs_ar']:.2f} "
            f"| {r['step_vs_paper_recipe']:.2f} |"
            for r in rows.values()
        ]
    for answered in STUDY.load("answers.json"):
        lines += ["", "## Answers side by side (seed 0, t=0.9, sub-block 8; the first two prompts "
                  "are in the corpus's distribution)", "",
                  "| prompt | " + " | ".join(ANSWERS_FROM) + " |", "|---" * (len(ANSWERS_FROM) + 1) + "|"]  # fmt: skip
        cell = {(r["run"], r["prompt"]): r["answer"] for r in answered["rows"]}
        for prompt in ANSWER_PROMPTS:
            cells = [repr(cell[name, prompt]) for name in ANSWERS_FROM]
            lines.append(f"| `{prompt}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(__doc__, HERE, run, summarise)
