"""Check W&B sweep files before `wandb sweep`: every grid point composes with Hydra.

    python -m src.launch_checks sweeps/decode_grid.yaml sweeps/block_size.yaml

(The launcher checks of `-m hydra/launcher=slurm|local` multiruns run by themselves: both
launcher configs install `src.config.launch.LaunchChecks`.)
"""

from __future__ import annotations

import argparse

from src.config import ConfigError
from src.config.launch import check_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description="Check W&B sweep files before `wandb sweep`.")
    parser.add_argument("sweeps", nargs="+", help="sweep yaml files, e.g. sweeps/decode_grid.yaml")
    for path in parser.parse_args().sweeps:
        try:
            configs = check_sweep(path)
        except ConfigError as err:
            raise SystemExit(f"config error: {err}") from None
        print(f"{path}: {len(configs)} runs compose")


if __name__ == "__main__":
    main()
