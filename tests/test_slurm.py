"""SLURM multirun on a real single-node cluster (scripts/slurm_cluster.sh), and launcher checks.

The cluster tests submit the tiny experiment through `hydra/launcher=slurm` exactly as a user
would, then preempt jobs mid-training in both ways SLURM does it: the pre-timeout signal
(SIGUSR1: `PreemptionCheckpoint` checkpoints at the next step boundary and requeues) and a hard
`scontrol requeue` (the job is killed and resumes from its last periodic checkpoint).
Without slurmdbd submitit reads job states as UNKNOWN, so results are checked, not states.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict, read_write

from src.config import ConfigError
from src.config.launch import check_partition, check_resources, job_overrides
from src.config.resolvers import gpus_per_node
from tests.conftest import SMALL, logged

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
# One CPU per job and per torch process, so the two jobs of a sweep run side by side on 2 cores
# and every run (SLURM or not) reduces in the same order.
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
STEPS = 12
COMMON = [
    *SMALL,
    "experiment=tiny",
    "trainer.accelerator=cpu",
    # Two micro-batches per step: a signal may come mid-step, and must wait for its end.
    "trainer.accumulate_grad_batches=2",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=4",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "paths.export_dir=${paths.output_dir}/export",
]


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_gpus_requested_only_for_gpu_training():
    assert gpus_per_node("gpu", 4) == 4 and gpus_per_node("cuda", 2) == 2
    assert gpus_per_node("cpu", 2) is None


def test_launcher_requests_one_task_per_device_and_lightnings_signal():
    cfg = compose_train("hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4")
    launcher = cfg.hydra.launcher
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 1
    assert launcher.additional_parameters.signal == f"USR1@{launcher.signal_delay_s}"
    assert launcher.additional_parameters.requeue is True
    check_resources(cfg, cfg, "slurm")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["hydra.launcher.tasks_per_node=2"],
            "hydra.launcher.tasks_per_node=2 but trainer.devices=1",
        ),
        (["hydra.launcher.nodes=2"], "hydra.launcher.nodes=2 but trainer.num_nodes=1"),
        (["trainer.accelerator=auto"], "trainer.accelerator=auto under hydra/launcher=slurm"),
    ],
)
def test_launcher_resources_that_lightning_would_reject(overrides, message):
    cfg = compose_train("hydra/launcher=slurm", "trainer.accelerator=cpu", *overrides)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_resources(cfg, cfg, "slurm")


def test_a_swept_device_count_is_checked_per_job():
    cfg = compose_train("hydra/launcher=slurm", "trainer.accelerator=cpu")
    with open_dict(cfg), read_write(cfg):
        cfg.hydra.overrides.task = ["trainer.accelerator=cpu", "trainer.devices=1,2", "seed=0,1"]
    jobs = job_overrides(cfg)
    assert len(jobs) == 4
    check_resources(cfg, compose_train(*jobs[0]), "slurm")
    with pytest.raises(ConfigError, match="trainer.devices=2"):
        check_resources(cfg, compose_train(*jobs[-1]), "slurm")


@pytest.mark.slow  # the entry point's imports alone take ~20 s here
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["trainer.accelerator=cpu", "trainer.devices=1,2"],
            "config error: hydra.launcher.tasks_per_node=1",
        ),
        # The 7B run's ~99 GiB checkpoint alone takes ~53 s at cluster.write_gbps=2.
        (
            ["experiment=qwen7b", "hydra.launcher.signal_delay_s=30"],
            "config error: hydra.launcher.signal_delay_s=30 is too short",
        ),
    ],
)
def test_bad_launcher_settings_fail_in_one_line_before_submission(tmp_path, overrides, message):
    result = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hydra/launcher=slurm"]
        + [*overrides, f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr
    assert not (tmp_path / ".submitit").exists()


def _free_port_pair() -> int:
    for port in range(16817, 17817, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for slurmctld/slurmd")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running single-node SLURM cluster; its environment (SLURM_CONF) for subprocesses."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CLUSTER_PORT": str(_free_port_pair())}
    up = subprocess.run(
        ["bash", str(CLUSTER), "up", str(state)], env=env, capture_output=True, text=True
    )
    if up.returncode == 2:
        pytest.skip(up.stderr.strip())
    assert up.returncode == 0, up.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "down", str(state)], env=env, check=True)


def squeue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout


class Multirun:
    """`python -m src.train -m hydra/launcher=slurm ...` running in the background."""

    def __init__(self, env: dict[str, str], sweep_dir: Path, *overrides: str) -> None:
        self.env, self.dir = env, sweep_dir
        self.log = open(sweep_dir.parent / f"{sweep_dir.name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "src.train", "-m", "hydra/launcher=slurm"]
            + [f"hydra.sweep.dir={sweep_dir}", *COMMON, *overrides],
            cwd=ROOT,
            env={**env, **ENV},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def job_id(self, num: int) -> str:
        """The array task id of sweep job `num` (`<array>_<num>`)."""
        return next((self.dir / ".submitit").glob(f"*_{num}")).name

    def wait(self, timeout: float = 420) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        deadline = time.time() + 60  # a job may still be completing after its result came back
        while squeue(self.env) and time.time() < deadline:
            time.sleep(1)
        assert rc == 0, (self.dir.parent / f"{self.dir.name}.log").read_text()[-4000:]

    def result(self, num: int) -> float:
        """The value the job returned (val/loss), from submitit's result file."""
        job = self.job_id(num)
        with open(self.dir / ".submitit" / job / f"{job}_0_result.pkl", "rb") as f:
            status, job_return = pickle.load(f)
        assert status == "success", job_return
        return job_return.return_value


@pytest.fixture(scope="module")
def straight(cluster, artifacts, tmp_path_factory) -> Multirun:
    """Two uninterrupted jobs (seeds 0 and 1): the multirun, and the preemption reference."""
    run = Multirun(
        cluster,
        tmp_path_factory.mktemp("straight") / "sweep",
        f"paths.artifacts_dir={artifacts}",
        "seed=0,1",
    )
    run.wait()
    return run


@pytest.mark.slow
def test_multirun_of_two_jobs_through_slurm(straight):
    losses = [straight.result(0), straight.result(1)]
    assert all(loss == loss for loss in losses) and losses[0] != losses[1]
    for num in (0, 1):
        assert len(logged(straight.dir / str(num), "train/loss")) == STEPS
        assert (straight.dir / str(num) / "export" / "diffusion.json").exists()
    array = straight.job_id(0).split("_")[0]
    script = (straight.dir / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --array=0-1" in script
    job_log = straight.dir / ".submitit" / straight.job_id(0) / f"{straight.job_id(0)}_0_log.err"
    assert "SLURM auto-requeueing enabled" in job_log.read_text()  # Lightning's SLURMEnvironment


@pytest.mark.slow
def test_preempted_jobs_resume_to_the_same_final_loss(cluster, artifacts, straight, tmp_path):
    # Job 0 gets SLURM's pre-timeout signal at step 3; job 1 is requeued hard at step 6 (killed
    # between periodic checkpoints, so it resumes from step 4 and redoes steps 4-6).
    preempt = {0: (3, ["scancel", "--signal=USR1"]), 1: (6, ["scontrol", "requeue"])}
    run = Multirun(cluster, tmp_path / "sweep", f"paths.artifacts_dir={artifacts}", "seed=0,0")
    while run.proc.poll() is None and preempt:
        for num, (step, command) in list(preempt.items()):
            if max(logged(run.dir / str(num), "train/loss"), default=-1) >= step:
                subprocess.run([*command, run.job_id(num)], env=cluster, check=True)
                del preempt[num]
        time.sleep(0.5)
    assert not preempt, "the jobs finished before they could be preempted"
    run.wait()

    reference = logged(straight.dir / "0", "train/loss")
    logs = run.dir / ".submitit" / run.job_id(0)
    job_log = "".join(p.read_text() for p in logs.glob(f"{run.job_id(0)}_0_log.*"))
    assert "preempted.ckpt written" in job_log, "no checkpoint on SIGUSR1"
    assert f"requeueing job {run.job_id(0)}" in job_log
    # Retention: the newest two periodic checkpoints, last.ckpt linking to the newest, and the
    # preemption checkpoint gone once a newer one exists.
    kept = sorted(p.name for p in (run.dir / "0/checkpoints").iterdir())
    assert kept == ["last.ckpt", "step000008.ckpt", "step000012.ckpt"], kept
    assert (run.dir / "0/checkpoints/last.ckpt").resolve().name == "step000012.ckpt"
    for num in (0, 1):
        assert len(list((run.dir / str(num)).glob("csv/version_*"))) == 2  # two attempts
        resumed = logged(run.dir / str(num), "train/loss")
        assert sorted(resumed) == sorted(reference)
        for step in reference:
            assert resumed[step] == pytest.approx(reference[step], abs=1e-6), (num, step)
        assert run.result(num) == pytest.approx(straight.result(0), abs=1e-6)


@pytest.mark.slow
def test_partition_check_against_the_cluster(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    check_partition(None)
    check_partition("debug")
    with pytest.raises(ConfigError, match="not a partition of this cluster"):
        check_partition("gpu")
    scontrol = ["scontrol", "update", "PartitionName=debug"]
    subprocess.run([*scontrol, "Default=NO"], env=cluster, check=True)
    try:
        with pytest.raises(ConfigError, match="no default partition: set hydra.launcher.partition"):
            check_partition(None)
        check_partition("debug")
    finally:
        subprocess.run([*scontrol, "Default=YES"], env=cluster, check=True)
