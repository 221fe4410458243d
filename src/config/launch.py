"""Checks of a multirun's launcher settings and of W&B sweep files, before anything is submitted.

The submitit launchers (conf/hydra/launcher/{slurm,local}.yaml) resolve their resources once per
sweep from the base config, while each job composes its own config: a job whose `trainer` does not
match what was requested would fail on the cluster (Lightning compares its devices with SLURM's
task count) after waiting in the queue. `LaunchChecks` is a Hydra callback that both launcher
configs install (`hydra.callbacks.launch_checks`); it turns such mistakes into one-line errors.

    python -m src.train -m hydra/launcher=slurm trainer=gpu trainer.devices=4 seed=0,1

`check_sweep` does the same for a W&B sweep file before `wandb sweep`: it expands every grid point
into the command line an agent would run (wandb's own expansion) and composes it with Hydra.

    python -m src.launch_checks sweeps/decode_grid.yaml sweeps/block_size.yaml
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from src.config.compose import CONF_DIR
from src.config.errors import ConfigError
from src.config.files import check_writable
from src.config.resolvers import GPU_ACCELERATORS

_ABSENT = object()


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for array tasks (Hydra multiruns);
    None outside SLURM. A requeued job keeps it."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def launcher_kind(cfg: DictConfig) -> str | None:
    """`slurm`, `local` (submitit launchers), or None for any other launcher."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    for kind in ("slurm", "local"):
        if target.endswith(f".{kind.capitalize()}Launcher"):
            return kind
    return None


def check_resources(base: DictConfig, job: DictConfig, kind: str) -> None:
    """The launcher's request (resolved from `base`) against one job's own `trainer`."""
    launcher, trainer = base.hydra.launcher, job.trainer
    if trainer.accelerator != base.trainer.accelerator:
        raise ConfigError(
            f"trainer.accelerator differs between sweep points ({base.trainer.accelerator} vs "
            f"{trainer.accelerator}): the launcher requests GPUs once per sweep, run one sweep each"
        )
    if kind == "local":
        return
    if trainer.accelerator not in (*GPU_ACCELERATORS, "cpu"):
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} under hydra/launcher=slurm: choose gpu "
            "(requests trainer.devices GPUs per node, e.g. trainer=gpu) or cpu"
        )
    for key, value in (("tasks_per_node", trainer.devices), ("nodes", trainer.num_nodes)):
        requested = launcher[key]
        lightning_key = "devices" if key == "tasks_per_node" else "num_nodes"
        if requested != value:
            raise ConfigError(
                f"hydra.launcher.{key}={requested} but trainer.{lightning_key}={value}: Lightning "
                f"needs one SLURM task per device; set both to the same value, once per sweep"
            )


def check_partition(partition: str | None) -> None:
    """The partition exists, or the cluster has a default one when none is given."""
    if shutil.which("scontrol") is None:
        raise ConfigError(
            "scontrol not found: hydra/launcher=slurm needs a SLURM cluster "
            "(use hydra/launcher=local on a single machine)"
        )
    result = subprocess.run(
        ["scontrol", "show", "partition", "--oneliner"], capture_output=True, text=True, timeout=30
    )
    if result.returncode:
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise ConfigError(f"scontrol cannot reach the cluster: {reason[0]}")
    fields = [
        dict(f.split("=", 1) for f in line.split() if "=" in f)
        for line in result.stdout.splitlines()
    ]
    names = [f["PartitionName"] for f in fields if "PartitionName" in f]
    if partition is None and not any(f.get("Default") == "YES" for f in fields):
        raise ConfigError(
            "the cluster has no default partition: set hydra.launcher.partition "
            f"(one of {', '.join(names)})"
        )
    if partition is not None and partition not in names:
        raise ConfigError(
            f"hydra.launcher.partition={partition} is not a partition of this cluster "
            f"(one of {', '.join(names)})"
        )


def job_overrides(cfg: DictConfig) -> list[list[str]]:
    """The override lists of every job of the sweep, as the basic sweeper expands them."""
    # Unresolved: `paths.export_dir=${paths.output_dir}/export` is for each job to resolve.
    task = OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


# A check of one job's config against the sweep's base config (its launcher settings).
JobCheck = Callable[[DictConfig, DictConfig], None]


def check_launch(cfg: DictConfig, config_name: str, job_checks: Sequence[JobCheck] = ()) -> None:
    """Every check of a multirun through a submitit launcher; ConfigError on the first failure.
    `job_checks` run on every job's config after the resource checks."""
    kind = launcher_kind(cfg)
    if kind is None:
        return
    jobs = [compose(config_name=config_name, overrides=o) for o in job_overrides(cfg)]
    for job in jobs:
        check_resources(cfg, job, kind)
    for job in jobs:
        for check in job_checks:
            check(cfg, job)
    if kind == "slurm":
        check_partition(cfg.hydra.launcher.partition)


def run_check(config: DictConfig, check: Callable[[], None]) -> None:
    """Runs a Hydra callback's check: a ConfigError is the one-line exit. The checks resolve
    `${hydra:...}` (paths, `runtime.choices`) against the run's or multirun's config, which
    Hydra sets only later (and the basic sweeper, never: `src.eval -m` failed)."""
    if not HydraConfig.initialized():
        HydraConfig.instance().set_config(config)
    try:
        check()
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


class LaunchChecks(Callback):
    """Runs `check_launch` before the sweeper submits anything. `job_checks`: dotted names of
    more `JobCheck`s, given by the launcher config (they live in higher layers, e.g. the SLURM
    signal lead time in `src.training.plan.check_signal_delay`)."""

    def __init__(self, job_checks: Sequence[str] = ()) -> None:
        self.job_checks = list(job_checks)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        checks = [get_method(name) for name in self.job_checks]
        run_check(config, lambda: check_launch(config, kwargs["config_name"], checks))


def check_folders_per_job(cfg: DictConfig, config_name: str, keys: Sequence[str]) -> None:
    """No two jobs of a multirun fill one folder: the later job's files would replace the
    earlier's. `keys`: the config keys of folders a job fills (a folder outside the job's
    output directory, such as the tiny experiments' `artifacts/` exports, is shared unless a
    swept value is part of it). Each job's `paths.output_dir` is its own folder under the
    sweep directory, as Hydra gives it."""
    owners: dict[tuple[str, str], int] = {}
    for num, overrides in enumerate(job_overrides(cfg)):
        job = compose(config_name=config_name, overrides=overrides)
        job.paths.output_dir = os.path.join(cfg.hydra.sweep.dir, str(num))
        for key in keys:
            folder = os.path.abspath(OmegaConf.select(job, key))
            first = owners.setdefault((key, folder), num)
            if first != num:
                name = key.rsplit(".", 1)[-1].removesuffix("_dir")
                raise ConfigError(
                    f"{key}={folder} is one folder for jobs {first} and {num} of this multirun, "
                    f"the later replacing the earlier: pass {key}='${{paths.output_dir}}/{name}' "
                    "(a folder per job)"
                )


class FolderPerJobCheck(Callback):
    """Runs `check_folders_per_job` before any job of a multirun starts (conf/train.yaml
    names the folders: the export)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_check(config, lambda: check_folders_per_job(config, kwargs["config_name"], self.keys))


class RunDirCheck(Callback):
    """Refuses a run (or multirun) directory that cannot be created, before Hydra creates it
    (its own attempt is a traceback) and before anything loads (conf/hydra/default.yaml)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        run_check(config, lambda: check_writable({key: OmegaConf.select(config, key)}))


def sweep_commands(sweep: Mapping[str, Any]) -> list[list[str]]:
    """The command line of every point of a grid sweep, as `wandb agent` builds it."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    names = list(sweep["parameters"])
    grids = []
    for name, spec in sweep["parameters"].items():
        if "values" not in spec and "value" not in spec:
            raise ConfigError(f"sweep parameter {name} has no values: only grid sweeps expand")
        grids.append(spec["values"] if "values" in spec else [spec["value"]])
    commands = []
    for point in itertools.product(*grids):
        macros = create_sweep_command_args(
            {"args": {n: {"value": v} for n, v in zip(names, point, strict=True)}}
        )
        macros |= {"env": ["/usr/bin/env"], "interpreter": [sys.executable]}
        macros["program"] = [sweep.get("program", "")]
        command: list[str] = []
        for chunk in map(str, create_sweep_command(list(sweep["command"]))):
            is_macro = chunk.startswith("${") and chunk.endswith("}")
            command += (macros.get(chunk[2:-1]) or []) if is_macro else [chunk]
        commands.append(command)
    return commands


def entry_and_overrides(command: list[str]) -> tuple[str, list[str]]:
    """`src.eval`, [overrides...] from `... python -m src.eval k=v ...`."""
    if "-m" not in command:
        raise ConfigError(f"sweep command {' '.join(command)} does not run `python -m <entry>`")
    at = command.index("-m")
    return command[at + 1], command[at + 2 :]


def check_sweep(path: str | Path) -> list[DictConfig]:
    """Every grid point of a W&B sweep file, composed with Hydra; ConfigError on the first
    sweep parameter that is not a key of the entry's config (Hydra would add or reject it)."""
    with open(path) as f:
        sweep = yaml.safe_load(f)
    commands = sweep_commands(sweep)
    entry, fixed = entry_and_overrides([str(c) for c in sweep["command"]])
    fixed = [o for o in fixed if not o.startswith("${")]
    config_name = entry.rsplit(".", 1)[-1]
    if not (CONF_DIR / f"{config_name}.yaml").exists():
        raise ConfigError(f"{path}: entry {entry} has no config conf/{config_name}.yaml")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = _compose(path, config_name, fixed)
        for name in sweep["parameters"]:
            if OmegaConf.select(base, name, default=_ABSENT) is _ABSENT:
                raise ConfigError(
                    f"{path}: sweep parameter {name} is not a key of the {entry} config "
                    f"(see `python -m {entry} --cfg job`)"
                )
        return [_compose(path, config_name, entry_and_overrides(c)[1]) for c in commands]


def _compose(path: str | Path, config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
