"""What a first multi-GPU run on a cluster depends on, checked here on CPU: the loss normalised
over the whole optimizer step (every rank, every micro-batch), intervals in optimizer steps, the
device each process takes, the run-directory lock on cluster filesystems, the preemption lead
time, the stop token through the export."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict, read_write

from src.config import ConfigError
from src.config.launch import check_folders_per_job, check_launch
from src.model.export import local_device, resolve_device
from src.training.checks import check_val_check_interval, val_check_batches
from src.training.guards import LOCK_FILE, RunDirLock
from src.training.plan import check_signal_delay, preemption_lead_time

ROOT = Path(__file__).resolve().parents[1]


def compose_train(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


# --- the loss over the whole step -------------------------------------------------------------


def fit_one_step(artifacts: Path, tmp_path: Path, name: str, **trainer: object) -> dict:
    """The gradients of the first optimizer step of experiment=tiny (what `src.train` builds)
    with `data.batch_size` and the trainer's devices / strategy / accumulation from `trainer`."""
    import lightning as L

    from src.config import instantiate
    from src.model import build_tokenizer
    from src.training.module import DiffusionLM
    from tests.fixtures.callbacks import GradDump

    batch_size = trainer.pop("batch_size")
    cfg = compose_train(
        "experiment=tiny",
        f"paths.artifacts_dir={artifacts}",
        f"data.cache_dir={tmp_path}/data",
        f"data.batch_size={batch_size}",
        "data.source.n_train=96",
        "data.source.n_val=16",
        "data.seq_len=128",
        # eps = 1: every supervised token of the first view masked, none of the second, so
        # the noise is the same whichever rank and micro-batch a context lands on.
        "diffusion.eps=1.0",
    )
    tokenizer = build_tokenizer(cfg.model)
    plain = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion", "optim")
    }
    module = DiffusionLM(tokenizer, **plain, seed=cfg.seed)
    path = tmp_path / f"{name}.pt"
    fit = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[GradDump(str(path))],
        **trainer,
    )
    fit.fit(module, datamodule=instantiate(cfg.data, tokenizer=tokenizer))
    return torch.load(path)


@pytest.mark.slow
def test_two_ranks_accumulating_two_batches_give_the_gradient_of_one_batch(artifacts, tmp_path):
    """2 DDP ranks x 2 accumulated micro-batches of 2 contexts = 1 process with the same 8
    contexts in one batch: the same gradient (SPEC section 2: one normaliser, the supervised
    tokens of the whole step; the AR term of experiment=tiny shares it)."""
    split = fit_one_step(
        artifacts,
        tmp_path,
        "split",
        batch_size=2,
        devices=2,
        strategy="ddp_spawn",  # DDP's gradient averaging; processes spawned from here
        accumulate_grad_batches=2,
    )
    whole = fit_one_step(artifacts, tmp_path, "whole", batch_size=8, devices=1)
    assert split.keys() == whole.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-7, msg=name)


# --- intervals in optimizer steps -----------------------------------------------------------


@pytest.mark.parametrize("experiment", ["qwen7b", "qwen1_5b"])
def test_the_paper_experiments_count_every_interval_in_optimizer_steps(experiment):
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.trainer.accumulate_grad_batches == 4
    # Lightning counts val_check_interval in batches: 500 steps are 2000 micro-batches.
    assert val_check_batches(cfg.trainer) == 500 * 4
    # The other intervals are counted in optimizer steps by Lightning and our callbacks.
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 250
    assert cfg.trainer.log_every_n_steps == 10
    assert val_check_batches(compose_train("trainer.val_check_interval=0.5").trainer) == 0.5
    for bad in ("trainer.val_check_interval=1.5", "trainer.val_check_interval=0"):
        with pytest.raises(ConfigError, match="trainer.val_check_interval"):
            check_val_check_interval(compose_train(bad).trainer)


# --- the device of each process ---------------------------------------------------------------


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(cuda=True) == torch.device("cuda", 3)
    assert local_device(cuda=False) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device(cuda=True) == torch.device("cuda", 0)  # one process: its first GPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


# --- the run-directory lock on cluster filesystems ------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_a_filesystem_without_locks_warns_and_runs(code, tmp_path, monkeypatch, caplog):
    # No filesystem here lacks flock (Lustre without -o flock, NFS without a lock manager):
    # flock fails as it does there, with the errno those filesystems return.
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lock = RunDirLock(str(tmp_path))
    assert "the filesystem has no file locks" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_flock_error_is_not_taken_for_a_lockless_filesystem(tmp_path, monkeypatch):
    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        RunDirLock(str(tmp_path))


HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": 4242, "host": sys.argv[2], "slurm_job": sys.argv[3]}).encode())
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_of_a_dead_node(tmp_path):
    """The run directory's lock, held (a real flock, as NFS keeps one after its node died) and
    recorded as SLURM job 77's on node-a."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / LOCK_FILE), "node-a", "77"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield tmp_path
    holder.kill()
    holder.wait()


def test_the_requeued_job_takes_over_its_lock_from_another_node(
    lock_of_a_dead_node, monkeypatch, caplog
):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="in use by another run \\(PID 4242 on node-a\\)"):
        RunDirLock(str(lock_of_a_dead_node))  # not a SLURM job
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match="in use by another run"):
        RunDirLock(str(lock_of_a_dead_node))  # another job
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with caplog.at_level(logging.WARNING):
        lock = RunDirLock(str(lock_of_a_dead_node))
    assert "taking over" in caplog.text and "SLURM job 77 on node-a" in caplog.text
    holder = json.loads((lock_of_a_dead_node / LOCK_FILE).read_text())
    assert holder == {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": "77"}
    lock.release()


def test_the_same_job_on_the_same_node_is_still_refused(tmp_path, monkeypatch):
    # A live holder on this node is a live process (the kernel drops a dead one's lock).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / LOCK_FILE), socket.gethostname(), "77"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        with pytest.raises(ConfigError, match="in use by another run"):
            RunDirLock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()


# --- the preemption lead time ---------------------------------------------------------------


def test_the_lead_time_of_a_7b_preemption():
    cfg = compose_train("experiment=qwen7b")
    lead = preemption_lead_time(cfg)
    # 7.6e9 parameters x 14 bytes (bf16 weights, fp32 master weights, two Adam moments).
    assert 95 < lead.checkpoint_gib < 105
    assert lead.write_s == pytest.approx(lead.checkpoint_gib * 2**30 / 2e9)
    # ~1.7e15 FLOPs per GPU and step (4 micro-batches of 3 x 2048 tokens, checkpointing) at
    # 100 TFLOP/s: the paper's ~17 s a step.
    assert 12 < lead.step_s < 22
    slower = preemption_lead_time(compose_train("experiment=qwen7b", "cluster.write_gbps=0.5"))
    assert slower.write_s == pytest.approx(4 * lead.write_s)


def test_the_slurm_launcher_refuses_a_signal_too_late_for_the_checkpoint():
    overrides = ["experiment=qwen7b", "hydra/launcher=slurm"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [*overrides, "hydra.launcher.signal_delay_s=30"], True)
        # The launcher config names the check; LaunchChecks runs it on every job.
        assert list(cfg.hydra.callbacks.launch_checks.job_checks) == [
            "src.training.plan.check_signal_delay"
        ]
        with pytest.raises(ConfigError) as err:
            check_launch(cfg, "train", [check_signal_delay])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("hydra.launcher.signal_delay_s=30 is too short")
    assert "raise it to >= " in message
    ok = compose_train(*overrides, hydra=True)  # the default 120 s
    check_signal_delay(ok, compose_train("experiment=qwen7b"))


# --- a folder per job -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "swept, shared",
    [
        (["experiment=qwen7b", "seed=0,1"], None),  # exports under each job's output dir
        (["seed=0,1", "paths.export_dir=${paths.output_dir}/export"], None),
        (["paths.export_dir=exports/a,exports/b"], None),
        # 4 jobs: 0 (seed 0) and 2 (seed 1) both export to exports/a
        (["seed=0,1", "paths.export_dir=exports/a,exports/b"], "exports/a for jobs 0 and 2"),
        (["seed=0,1", "paths.artifacts_dir=art"], "art/tiny for jobs 0 and 1"),  # tiny's export
        (["seed=0,1", "paths.export_dir=exports/one"], "exports/one for jobs 0 and 1"),
    ],
)
def test_a_multirun_refuses_jobs_that_share_an_export(swept, shared, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
        with open_dict(cfg), read_write(cfg):
            cfg.hydra.overrides.task = swept
            cfg.hydra.sweep.dir = str(tmp_path)
        if shared is None:
            check_folders_per_job(cfg, "train", ["paths.export_dir"])
            return
        with pytest.raises(ConfigError) as err:
            check_folders_per_job(cfg, "train", ["paths.export_dir"])
    folder, jobs = shared.split(" for ")
    assert str(err.value).startswith(
        f"paths.export_dir={os.path.abspath(folder)} is one folder for {jobs} of this multirun"
    )


# --- the dtype a run builds its model in ---------------------------------------------------


@pytest.mark.parametrize(
    "strategy, precision, dtype",
    [
        ("deepspeed", "bf16-mixed", torch.bfloat16),  # DeepSpeed casts to bf16 anyway
        ("deepspeed", "16-mixed", torch.float16),
        ("deepspeed", "32-true", torch.float32),
        ("ddp", "bf16-mixed", torch.float32),  # autocast: the optimizer updates fp32 weights
        ("ddp", "bf16-true", torch.bfloat16),
        ("ddp", "32-true", torch.float32),
    ],
)
def test_the_model_is_built_in_the_dtype_its_strategy_trains(strategy, precision, dtype):
    import lightning as L

    from src.training.module import parameter_dtype
    from src.training.strategy import DeepSpeedStrategy

    chosen = (
        DeepSpeedStrategy(config={"zero_optimization": {"stage": 3}})
        if strategy == "deepspeed"
        else "ddp"
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=chosen, precision=precision, logger=False
    )
    assert parameter_dtype(trainer) == dtype
    assert parameter_dtype(None) == torch.float32
    assert compose_train("experiment=qwen7b").model.dtype == "auto"


# --- the stop token through training and export ---------------------------------------------


def test_the_export_stops_at_the_end_of_a_turn_when_eos_differs(tmp_path):
    from src.data.tokenizer import train_tokenizer
    from src.decoding import make_decoder
    from src.model import ensure_mask_token, load_export, save_export
    from src.training.module import DiffusionLM
    from tests.fixtures.exports import DECODE, TINY_CONFIG

    tokenizer = train_tokenizer(0)
    tokenizer.eos_token = tokenizer.pad_token  # a base checkpoint's eos, not <|im_end|>
    ensure_mask_token(tokenizer)
    diffusion = compose_train().diffusion
    module = DiffusionLM(
        tokenizer, {"config": TINY_CONFIG, "dtype": "auto"}, dict(diffusion), {"lr": 1e-3}
    )
    module.configure_model()
    save_export(module.model, tokenizer, module.export_settings(), str(tmp_path))
    decoder = make_decoder(load_export(str(tmp_path)), DECODE)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id != im_end
    assert decoder.export.settings["stop_token"] == "<|im_end|>"
    assert decoder.export.settings["stop_token_id"] == im_end
    assert module.model.dtype == torch.float32  # dtype auto, no trainer: float32
