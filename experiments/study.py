"""What the study scripts share (`python -m experiments.<study>.run`): the pipeline's commands
run in subprocesses, fine-tunes into `runs/<name>/seed<k>/` (git-ignored), measurements kept
as JSON under `metrics/` (committed) and skipped when present, and the cells of their tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AR_INIT = ROOT / "artifacts" / "tiny_ar"
NOT_RUN = "not run yet"


def python(*args: str) -> None:
    """Run `python -m ...` of this checkout's interpreter; stop the study if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    print("+ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True)


def ar_init() -> Path:
    """The AR-init every tiny fine-tune starts from, trained on first use."""
    if not (AR_INIT / "diffusion.json").exists():
        python("-m", "src.train", "experiment=tiny_ar")
    return AR_INIT


class Study:
    """A study's folders; its runs are the configs `conf/experiment/<group>/<name>.yaml`.
    `starts_from` maps a run to the run whose export it starts from (default: the AR-init)."""

    def __init__(
        self, here: Path, group: str, starts_from: Mapping[str, str] | None = None
    ) -> None:
        self.here, self.group, self.starts_from = here, group, dict(starts_from or {})
        self.runs, self.metrics = here / "runs", here / "metrics"
        self.train_overrides: list[str] = []
        self.limit: int | None = None

    def trial(self, root: Path, train_overrides: Sequence[str], limit: int) -> None:
        """Run the study under `root` instead (its runs, metrics and results.md) on a budget:
        `train_overrides` go to every fine-tune, evaluations take the first `limit` problems.
        A check of the study's whole pipeline that leaves its committed results alone."""
        self.here, self.runs, self.metrics = root, root / "runs", root / "metrics"
        self.train_overrides, self.limit = list(train_overrides), limit

    def fine_tune(self, name: str, seed: int) -> Path:
        """The export of run `name` for `seed`, trained when missing (a half-finished run
        resumes from its run directory's last checkpoint)."""
        export = self.runs / name / f"seed{seed}" / "export"
        if not (export / "diffusion.json").exists():
            overrides = [f"experiment={self.group}/{name}"]
            if name in self.starts_from:
                overrides.append(f"model.pretrained={self.fine_tune(self.starts_from[name], seed)}")
            elif not any(o.startswith("model.pretrained=") for o in self.train_overrides):
                ar_init()
            python("-m", "src.train", *overrides, *self.train_overrides, f"seed={seed}",
                   f"hydra.run.dir={export.parent}", f"paths.export_dir={export}")  # fmt: skip
        return export

    def eval_dir(self, out: Path) -> Path:
        """The run directory (git-ignored) of the evaluation whose metrics are kept as `out`."""
        return self.runs / "eval" / out.relative_to(self.metrics).with_suffix("")

    def evaluate(self, export: Path, out: Path, *overrides: str) -> None:
        """`src.eval` on the whole synthetic test split; its metrics.json is kept as `out`."""
        run_dir = self.eval_dir(out)
        python("-m", "src.eval", f"ckpt={export}", "benchmark=synthetic", *overrides,
               *self.limit_override(), f"hydra.run.dir={run_dir}")  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "metrics.json", out)

    def limit_override(self) -> list[str]:
        """`limit=N` for the commands that take the problems, in a trial."""
        return [] if self.limit is None else [f"limit={self.limit}"]

    def load(self, pattern: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.metrics.glob(pattern))]


def mean_spread(values: Sequence[float]) -> str:
    """`mean ± sample std (n)`; a single value has no spread; none: not run."""
    if not values:
        return NOT_RUN
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def mean(values: Sequence[float], digits: int) -> str:
    return f"{statistics.mean(values):.{digits}f}" if values else NOT_RUN


def main(
    doc: str,
    here: Path,
    run: Callable[..., None],
    summarise: Callable[[], str],
    trial: Callable[[Path], None] | None = None,
) -> None:
    """A study's command line: run what `--seeds` (and `--runs`, where the study takes it)
    lack, then write results.md from metrics/. A study that gives `trial` (it moves the study
    to a folder and a tiny budget, `Study.trial`) takes `--trial DIR`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", help="only these runs (default: all)")
    parser.add_argument("--summarise", action="store_true", help="only rebuild results.md")
    if trial is not None:
        parser.add_argument(
            "--trial", type=Path, metavar="DIR",
            help="the whole study on a tiny budget under DIR (results.md too), as a check",
        )  # fmt: skip
    args = parser.parse_args()
    if getattr(args, "trial", None) is not None:
        trial(args.trial)
        here = args.trial
    if not args.summarise:
        run(args.seeds, **({"runs": args.runs} if args.runs else {}))
    (here / "results.md").write_text(summarise())
    print(f"wrote {here / 'results.md'}")
