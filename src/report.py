"""Speed/accuracy report of a decode sweep: a markdown table and the Pareto front as a PNG.

    python -m src.report multirun/eval/synthetic/2026-01-01_12-00-00   # a Hydra multirun
    python -m src.report multirun/sweeps/<sweep_id>                     # W&B agents' run dirs
    python -m src.report --wandb <entity>/<project>/<sweep_id> reports/  # from the W&B API
    python -m src.report outputs/paper/2026-01-01_12-00-00              # a `src.paper` run

Writes `report.md` and `pareto.png` into the directory (or `--out`); see `src.evaluation.report`.
A `python -m src.paper` run folder (it holds `paper.json`) gets the paper's Table 1 instead:
`table1.md` and `table1.json` (`src.evaluation.table`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.evaluation.report import read_runs, read_wandb_sweep, report
from src.evaluation.table import MANIFEST, write_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="multirun/sweep directory (with --wandb: the output dir)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT/SWEEP", help="read runs from W&B")
    parser.add_argument("--out", help="where to write report.md and pareto.png (default: dir)")
    args = parser.parse_args()
    if not args.wandb and (Path(args.dir) / MANIFEST).is_file():
        table, data = write_table(args.dir, args.out)
        print(table.read_text(), end="")
        print(f"wrote {table} and {data}")
        return
    try:
        rows = read_wandb_sweep(args.wandb) if args.wandb else read_runs(args.dir)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    table, figure = report(rows, args.out or args.dir)
    print(table.read_text(), end="")
    print(f"wrote {table} and {figure}")


if __name__ == "__main__":
    main()
