"""Study 1: the paper's Tables 1-3 and Fig. 4 in miniature, on the built-in synthetic corpus.

    make tiny-repro                                   # 3 seeds, about 35 min per seed on 2 cores
    .venv/bin/python -m experiments.tiny_repro.run --seeds 0 1 2
    .venv/bin/python -m experiments.tiny_repro.run --summarise   # tables + plot from metrics/

Every fine-tune starts from the same AR-init (`artifacts/tiny_ar`, made by
`python -m src.train experiment=tiny_ar` when missing) and runs in a subprocess,
`python -m src.train experiment=tiny_repro/<variant> seed=<k>` (each variant is a config file in
conf/experiment/tiny_repro/), into `runs/<variant>/seed<k>/` (git-ignored: checkpoints, logs,
export). Each measurement's raw
JSON is copied to `metrics/` (committed); `results.md` and `fig4_threshold.png` are built
from `metrics/` alone. A step whose JSON exists is skipped, so an interrupted study resumes.

- Table 1: AR-init and AR fine-tune (`tiny_ar_ft`) decoded AR vs the block-diffusion fine-tune
  (`tiny`) decoded with cached parallel decoding: `src.bench decode`, one process per seed,
  batch 1, all variants interleaved so their tokens/s compare.
- Table 2: naive (no padding, no complementary view) -> +pad -> +pad +complementary.
- Table 3: sub-block size {2, 4, 8, 16, 32} at block size 32 (`src.eval`, batch 8).
- Fig. 4: threshold {1.0, 0.95, 0.9, 0.8, 0.7, 0.5}, accuracy vs tokens/s (from Table 1's runs).
- More steps (seed 0): the block-diffusion fine-tune at 2700 and 5400 steps (AR control at
  2700), the test split decoded every 300 steps during training, then Table 1 at sub-block 8
  and 32, on 1 and 2 threads.
- Where the arithmetic gap comes from (seed 0, 900 steps): fine-tune learning rates on both
  sides of the default, a 2x wider model, and `probe_arithmetic.py` on each fine-tune.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from experiments.study import NOT_RUN, Study, ar_init, main, mean, mean_spread, python
from src.data.synthetic import TASKS

HERE = Path(__file__).resolve().parent

# The study's runs: `experiment=tiny_repro/<name>` (conf/experiment/tiny_repro/), and what each is.
FINE_TUNES = {
    "ar_ft": "AR fine-tune (same data and steps)",
    "bd_naive": "block diffusion, naive",
    "bd_pad": "block diffusion, +pad",
    "bd": "block diffusion, +pad +complementary (full recipe)",
    "bd_2700": "block diffusion, full recipe, 2700 steps",
    "bd_5400": "block diffusion, full recipe, 5400 steps",
    "ar_ft_2700": "AR fine-tune, 2700 steps",
    "bd_lr4e-3": "block diffusion, lr 4e-3",
    "bd_lr3e-3": "block diffusion, lr 3e-3",
    "bd_lr5e-4": "block diffusion, lr 5e-4",
    "bd_lr2e-4": "block diffusion, lr 2e-4",
    "ar_wide": "AR-init, 2x wider",
    "bd_wide": "block diffusion, 2x wider",
}
# Table 1 disagrees with the paper at 900 steps: is it the budget? The full recipe at 3x and 6x
# the steps; the AR control needs no more than 3x (it is at 1.000 on the test split there).
LONG_STEPS = (2700, 5400)
LONG_AR_STEPS = 2700
LONG_SUB_BLOCKS = (8, 32)  # the default and Table 3's most parallel setting
# Where the arithmetic gap comes from (seed 0, 900 steps; the baseline is `bd`).
GAP_LRS = ("4e-3", "3e-3", "5e-4", "2e-4")
# A fine-tune named here starts from that run's export instead of the default AR-init.
STARTS_FROM = {"bd_wide": "ar_wide"}
STUDY = Study(HERE, "tiny_repro", STARTS_FROM)
METRICS = STUDY.metrics
fine_tune, evaluate, load = STUDY.fine_tune, STUDY.evaluate, STUDY.load
# The fine-tunes that `probe_arithmetic.py` probes.
PROBED = ("bd", f"bd_{LONG_STEPS[0]}", *(f"bd_lr{lr}" for lr in GAP_LRS), "bd_wide")
THRESHOLDS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
SUB_BLOCKS = (2, 4, 8, 16, 32)
TABLE_THRESHOLDS = (1.0, 0.9)  # the two that Tables 1 and 2 report
PER_TASK_ROWS = (
    ("AR-init, AR", "ar_init/ar.json"),
    ("AR fine-tune, AR", "ar_ft/seed*.json"),
    ("block diffusion, parallel t=0.9 (s=8)", "sub_block/s8_seed*.json"),
    ("block diffusion, parallel t=0.9 (s=2)", "sub_block/s2_seed*.json"),
    ("block diffusion, left to right (s=1, t=1.0)", "left_to_right/seed*.json"),
)


def missing(out: Path) -> bool:
    """Fine-tunes are only (re)made for measurements not yet in metrics/: a fresh checkout
    with the committed JSON files reruns nothing."""
    return not out.exists()


def bench(
    bd: Path, ar_ft: Path, out: Path, thresholds: Sequence[float] = THRESHOLDS, *options: str
) -> None:
    """Table 1 and Fig. 4 for one seed: AR baselines and every threshold, interleaved."""
    out.parent.mkdir(parents=True, exist_ok=True)
    python("-m", "src.bench", "decode", f"ckpt={bd}", f"ar_ckpt={ar_ft}", f"out={out}",
           f"thresholds=[{','.join(map(str, thresholds))}]", "sub_block_cache=[false]",
           "batch_sizes=[1]", *options)  # fmt: skip


def decode_eval_curve(run_dir: Path, out: Path) -> None:
    """The training-time decode evals (`callbacks=decode_eval`) of a run, from its CSV log."""
    prefix = "decode_eval/synthetic/accuracy"
    points = []
    for log in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(log.open()):
            if row.get(prefix):
                by_task = {task: float(row[f"{prefix}/{task}"]) for task in TASKS}
                points.append({"step": int(row["step"]), "accuracy": float(row[prefix]),
                               "by_task": by_task})  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(points, indent=2) + "\n")


def run(seeds: Sequence[int]) -> None:
    """Cheapest, most central measurements first: a cut-short study still has Tables 1 and 3
    for every seed."""
    ar_init_eval = METRICS / "ar_init" / "ar.json"
    if missing(ar_init_eval):
        evaluate(ar_init(), ar_init_eval, "decoder=ar")
    # One token per step, strictly left to right: are errors the model's or the commits'?
    left_to_right = ("decode.sub_block_size=1", "decode.threshold=1.0")
    for seed in seeds:
        table1 = METRICS / "bench" / f"seed{seed}.json"
        ar_ft_eval = METRICS / "ar_ft" / f"seed{seed}.json"
        bd_evals = {
            METRICS / "sub_block" / f"s{s}_seed{seed}.json": (f"decode.sub_block_size={s}",)
            for s in SUB_BLOCKS
        }
        bd_evals[METRICS / "left_to_right" / f"seed{seed}.json"] = left_to_right
        if missing(table1):
            bench(fine_tune("bd", seed), fine_tune("ar_ft", seed), table1)
        if missing(ar_ft_eval):
            evaluate(fine_tune("ar_ft", seed), ar_ft_eval, "decoder=ar")
        for out, overrides in bd_evals.items():
            if missing(out):
                evaluate(fine_tune("bd", seed), out, *overrides)
    # Table 2 last: two more fine-tunes per seed for one table.
    for seed in seeds:
        for name in ("bd", "bd_pad", "bd_naive"):
            for t in TABLE_THRESHOLDS:
                out = METRICS / "ablation" / f"{name}_t{t}_seed{seed}.json"
                if missing(out):
                    evaluate(fine_tune(name, seed), out, f"decode.threshold={t}")
    # 3x and 6x steps, seed 0 only: Table 1 again, on 1 and on both cores.
    seed = seeds[0]
    for steps in LONG_STEPS:
        out_dir = METRICS / "long" / f"steps{steps}"
        curve = out_dir / f"curve_seed{seed}.json"
        if missing(curve):
            decode_eval_curve(fine_tune(f"bd_{steps}", seed).parent, curve)
        for threads in (1, 2):
            for s in LONG_SUB_BLOCKS:
                out = out_dir / f"bench_s{s}_threads{threads}_seed{seed}.json"
                if missing(out):
                    bd = fine_tune(f"bd_{steps}", seed)
                    ar_ft = fine_tune(f"ar_ft_{LONG_AR_STEPS}", seed)
                    # All 200 test problems: a 1-point accuracy difference is 2 of them.
                    options = (f"threads={threads}", f"decode.sub_block_size={s}", "limit=null")
                    bench(bd, ar_ft, out, TABLE_THRESHOLDS, *options)
    # Where the arithmetic gap comes from, seed 0 as well. The AR-init and the baseline are
    # measured again: Tables 1-3 started from an AR-init trained in an earlier session (0.970 on
    # the test split); the one trained since scores 0.995.
    if missing(METRICS / "arith_gap" / "ar_init.json"):
        evaluate(ar_init(), METRICS / "arith_gap" / "ar_init.json", "decoder=ar")
    baseline = METRICS / "arith_gap" / f"bd_seed{seed}.json"
    if missing(baseline):
        evaluate(fine_tune("bd", seed), baseline)
    for lr in GAP_LRS:
        curve = METRICS / "arith_gap" / f"curve_lr{lr}_seed{seed}.json"
        if missing(curve):
            decode_eval_curve(fine_tune(f"bd_lr{lr}", seed).parent, curve)
    ar_wide_eval = METRICS / "arith_gap" / f"ar_wide_seed{seed}.json"
    if missing(ar_wide_eval):
        evaluate(fine_tune("ar_wide", seed), ar_wide_eval, "decoder=ar")
    curve = METRICS / "arith_gap" / f"curve_wide_seed{seed}.json"
    if missing(curve):
        decode_eval_curve(fine_tune("bd_wide", seed).parent, curve)
    for name in PROBED:
        out = METRICS / "arith_gap" / f"probe_{name}_seed{seed}.json"
        if missing(out):
            python(str(HERE / "probe_arithmetic.py"), str(fine_tune(name, seed)), f"--out={out}")


def summarise() -> str:
    """results.md (and the Fig. 4 PNG) from the JSON files under metrics/."""
    lines = ["# Results (generated by `run.py --summarise` from `metrics/`)", ""]
    benches = load("bench/seed*.json")

    def rows(variant: str) -> list[dict]:
        return [next(r for r in b["rows"] if r["variant"] == variant) for b in benches]

    prompts = benches[0]["num_prompts"] if benches else 0
    lines += [
        f"## Table 1 shape ({len(benches)} seed(s) x {prompts} test problems, "
        "greedy, batch 1; accuracy is exact match)",
        "",
        "| model | decoding | accuracy | tokens/s | tokens/forward | x AR-FT tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    ar_init = [m["accuracy"] for m in load("ar_init/ar.json")]
    lines.append(f"| AR-init (`tiny_ar`), batch 8 | AR | {mean_spread(ar_init)} | | 1.00 | |")
    table1 = [
        ("AR fine-tune", "AR", "ar (ar_ckpt) bs=1"),
        ("block diffusion", "AR (same weights)", "ar (ckpt) bs=1"),
    ]
    table1 += [
        ("block diffusion", f"parallel, threshold {t}", f"diffusion t={t} cache=off bs=1")
        for t in (1.0, 0.9)
    ]
    for model, decoding, variant in table1:
        r = rows(variant)
        lines.append(
            f"| {model} | {decoding} | {mean_spread([x['accuracy'] for x in r])} "
            f"| {mean([x['tokens_per_second'] for x in r], 0)} "
            f"| {mean([x['tokens_per_forward'] for x in r], 2)} "
            f"| {mean_spread([x['speedup_vs_ar'] for x in r])} |"
        )

    lines += ["", "## Table 2 shape (batch 8)", "",
              "| recipe | accuracy, threshold 1.0 | accuracy, threshold 0.9 | tokens/step, 0.9 |",
              "|---|---|---|---|"]  # fmt: skip
    for name in ("bd_naive", "bd_pad", "bd"):
        by_t = {t: load(f"ablation/{name}_t{t}_seed*.json") for t in TABLE_THRESHOLDS}
        lines.append(
            f"| {FINE_TUNES[name]} | {mean_spread([m['accuracy'] for m in by_t[1.0]])} "
            f"| {mean_spread([m['accuracy'] for m in by_t[0.9]])} "
            f"| {mean([m['unmasked_per_step'] for m in by_t[0.9]], 2)} |"
        )

    lines += ["", "## Table 3 shape (block 32, threshold 0.9, batch 8)", "",
              "| sub-block size | accuracy | tokens/step per sequence |", "|---|---|---|"]  # fmt: skip
    for s in SUB_BLOCKS:
        ms = load(f"sub_block/s{s}_seed*.json")
        lines.append(
            f"| {s} | {mean_spread([m['accuracy'] for m in ms])} "
            f"| {mean([m['unmasked_per_step'] for m in ms], 2)} |"
        )

    lines += ["", "## Accuracy per task family (200 test problems, batch 8)", "",
              "| model, decoding | " + " | ".join(TASKS) + " |",
              "|---|" + "---|" * len(TASKS)]  # fmt: skip
    for label, pattern in PER_TASK_ROWS:
        ms = [m for m in load(pattern) if "by_task" in m]
        cells = [mean_spread([m["by_task"][task] for m in ms]) for task in TASKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += long_budget()
    lines += arithmetic_gap()
    lines += ["", "## Fig. 4 shape (batch 1): `fig4_threshold.png`", "",
              "| threshold | accuracy | tokens/s | tokens/forward | x AR-FT tokens/s |",
              "|---|---|---|---|---|"]  # fmt: skip
    points = []
    for t in THRESHOLDS:
        r = rows(f"diffusion t={t} cache=off bs=1")
        acc = [x["accuracy"] for x in r]
        speed = [x["tokens_per_second"] for x in r]
        points.append((t, acc, speed))
        lines.append(
            f"| {t} | {mean_spread(acc)} | {mean(speed, 0)} "
            f"| {mean([x['tokens_per_forward'] for x in r], 2)} "
            f"| {mean_spread([x['speedup_vs_ar'] for x in r])} |"
        )
    if benches:
        plot_fig4(points, rows("ar (ar_ckpt) bs=1"))
    return "\n".join(lines) + "\n"


def long_budget() -> list[str]:
    """The 3x- and 6x-steps runs: Table 1 rows, and the decode-eval curves per task family."""
    lines = ["", "## More steps (seed 0; AR control at "
             f"{LONG_AR_STEPS} steps; 200 test problems, batch 1)", "",
             "| block-diffusion steps | sub-block | threads | AR-FT accuracy "
             "| accuracy, t=1.0 | accuracy, t=0.9 | tokens/forward, 0.9 | x AR-FT tokens/s, 0.9 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for steps in LONG_STEPS:
        for s in LONG_SUB_BLOCKS:
            for bench_file in sorted(METRICS.glob(f"long/steps{steps}/bench_s{s}_threads*.json")):
                report = json.loads(bench_file.read_text())
                row = {r["variant"]: r for r in report["rows"]}
                ar, t1, t09 = (row[f"{v} bs=1"] for v in ("ar (ar_ckpt)", "diffusion t=1.0 cache=off",
                                                           "diffusion t=0.9 cache=off"))  # fmt: skip
                lines.append(
                    f"| {steps} | {s} | {report['threads']} | {ar['accuracy']:.3f} "
                    f"| {t1['accuracy']:.3f} | {t09['accuracy']:.3f} "
                    f"| {t09['tokens_per_forward']:.2f} | {t09['speedup_vs_ar']:.2f} |"
                )
    for curve in sorted(METRICS.glob("long/steps*/curve_seed*.json")):
        lines += ["", f"Decode eval during the {curve.parent.name.removeprefix('steps')}-step "
                  "fine-tune (200 test problems, threshold 0.9, sub-block 8, batch 8):", "",
                  "| step | accuracy | " + " | ".join(TASKS) + " |",
                  "|---|---|" + "---|" * len(TASKS)]  # fmt: skip
        for point in json.loads(curve.read_text()):
            cells = " | ".join(f"{point['by_task'][task]:.2f}" for task in TASKS)
            lines.append(f"| {point['step']} | {point['accuracy']:.3f} | {cells} |")
    return lines


def arithmetic_gap() -> list[str]:
    """Learning rate and width at 900 steps: accuracy at the end, and each curve."""
    lines = ["", "## Where the arithmetic gap comes from (seed 0, 900 steps; 200 test problems, "
             "threshold 0.9, sub-block 8, batch 8)", "",
             "| fine-tune | AR-init accuracy (arithmetic) | step 300 | step 600 | step 900 "
             "| arithmetic at 900 |", "|---|---|---|---|---|---|"]  # fmt: skip
    ar_init = load("arith_gap/ar_init.json")
    ar_wide = load("arith_gap/ar_wide_seed0.json")
    baseline = load("arith_gap/bd_seed0.json")
    if ar_init and baseline:
        lines.append(
            f"| lr 2e-3 (`experiment=tiny`) | {ar_init[0]['accuracy']:.3f} "
            f"({ar_init[0]['by_task']['arithmetic']:.2f}) | | | {baseline[0]['accuracy']:.3f} "
            f"| {baseline[0]['by_task']['arithmetic']:.2f} |"
        )
    runs = [(f"lr {lr}", f"curve_lr{lr}_seed0.json", ar_init) for lr in GAP_LRS]
    runs.append(
        ("2x wider (hidden 256), AR-init lr 1.5e-3, lr 1e-3", "curve_wide_seed0.json", ar_wide)
    )
    for label, name, init in runs:
        curve = load(f"arith_gap/{name}")
        if not curve or not init:
            continue
        by_step = {point["step"]: point for point in curve[0]}
        cells = " | ".join(
            f"{by_step[step]['accuracy']:.3f}" if step in by_step else NOT_RUN
            for step in (300, 600, 900)
        )
        last = by_step[max(by_step)]
        lines.append(
            f"| {label} | {init[0]['accuracy']:.3f} ({init[0]['by_task']['arithmetic']:.2f}) "
            f"| {cells} | {last['by_task']['arithmetic']:.2f} |"
        )
    lines += ["", "Step results teacher-forced (`probe_arithmetic.py`, the 50 arithmetic test "
              "problems; accuracy of step 1 / 2 / 3's result):", "",
              "| fine-tune | left to right | copy visible | nothing after | operands masked |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name in PROBED:
        for report in load(f"arith_gap/probe_{name}_seed0.json"):
            cells = " | ".join(
                " / ".join(f"{a:.2f}" for a in by_step)
                for by_step in report["accuracy_by_step"].values()
            )
            lines.append(f"| {FINE_TUNES[name]} | {cells} |")
    return lines


def plot_fig4(points: list[tuple[float, list[float], list[float]]], ar: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for t, acc, speed in points:
        ax.errorbar(statistics.mean(speed), statistics.mean(acc),
                    xerr=statistics.pstdev(speed), yerr=statistics.pstdev(acc), fmt="o",
                    color="tab:blue")  # fmt: skip
        ax.annotate(f"{t}", (statistics.mean(speed), statistics.mean(acc)),
                    textcoords="offset points", xytext=(5, 5))  # fmt: skip
    ar_speed = statistics.mean(r["tokens_per_second"] for r in ar)
    ar_acc = statistics.mean(r["accuracy"] for r in ar)
    ax.plot([ar_speed], [ar_acc], "s", color="tab:red", label="AR fine-tune, AR decoding")
    ax.set_xlabel("tokens/s (batch 1, CPU)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("threshold sweep (labels: threshold)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(HERE / "fig4_threshold.png", dpi=120)


if __name__ == "__main__":
    main(__doc__, HERE, run, summarise)
