"""What keeps a training run's work safe: a loss that stops being finite ends the run (and its
checkpoints from then on are removed), and a run directory has one run at a time. (Output
folders are checked before anything loads: `src.config.files.check_writable`.)"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from src.config import ConfigError
from src.config.launch import slurm_job_id
from src.training.callbacks import FinalCheckpoint

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message is one line that says what to change."""


class FiniteLoss(L.Callback):
    """Skip the update of an optimizer step whose loss or gradients are not finite on any rank,
    and stop the run after more than `tolerated_steps` such steps in a row.

    No update computed from a non-finite loss is ever applied, so the state the run stops in
    is that of its last good step (the weights after the last finite update, optimizer
    moments included). The stop writes that state as a checkpoint, `last.ckpt` linking to it
    (unless no update since the newest checkpoint: a resume that fails again writes nothing and
    so never rotates out an older one), then raises `TrainingDiverged`; no HF export is
    written. The skip is exact: here the gradients are dropped before the optimizer step
    (torch optimizers leave parameters without gradients untouched), under DeepSpeed its own
    overflow check skips the step, and a DeepSpeed config that turns that check off is caught
    at the first non-finite step. The skipped steps still count (data, LR schedule), so a
    resumed run continues after the batches that failed.
    """

    def __init__(self, tolerated_steps: int = 0) -> None:
        if tolerated_steps < 0:
            raise ConfigError(
                f"callbacks.finite_loss.tolerated_steps={tolerated_steps} must be >= 0"
            )
        self.tolerated_steps = tolerated_steps
        self.first_bad_step: int | None = None
        self.bad_steps = 0
        self.applied_step = 0  # the global step after the last update applied
        self._finite: torch.Tensor | None = None  # every micro-batch loss of the step so far
        self._step_good: bool | None = None  # decided before the step's update, else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.applied_step = trainer.global_step  # a resumed state is checkpointed already

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach()).all()  # no host sync per micro-batch
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.fit_loop._should_accumulate():
            return  # DeepSpeed accumulates itself: Lightning calls this every micro-batch
        finite = torch.ones((), dtype=torch.bool) if self._finite is None else self._finite.cpu()
        self._finite = None
        # A finite loss can still give non-finite gradients. Under DeepSpeed they live in its
        # partitions (it checks them itself); a loss scaler's overflows are its own to skip.
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                finite &= torch.stack([torch.isfinite(g).all() for g in grads]).all().cpu()
        self._step_good = trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        if not self._step_good and not _is_deepspeed(trainer):
            optimizer.zero_grad(set_to_none=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        # Acts at the batch that ended an optimizer step (the end of an accumulation window),
        # where every rank is at the same boundary and a checkpoint resumes exactly.
        good, self._step_good = self._step_good, None
        if good is None:
            return
        step = trainer.global_step - 1  # the step just taken
        if _is_deepspeed(trainer):
            applied = trainer.strategy.deepspeed_engine.was_step_applied()
            if not good and applied:
                raise TrainingDiverged(
                    f"training diverged: the loss was not finite at step {step} and DeepSpeed "
                    "applied its update (its config turns off the gradient overflow check: "
                    "bf16.check_grad_overflow or zero_optimization.compute_grad_norm); no "
                    "export written, resume from a checkpoint before it: lower optim.lr (or "
                    "raise trainer.gradient_clip_val)"
                )
            good = applied  # DeepSpeed skipped the update for its non-finite gradients
        if good:
            self.first_bad_step, self.bad_steps = None, 0
            self.applied_step = trainer.global_step
            return
        if self.first_bad_step is None:
            self.first_bad_step = step
        self.bad_steps += 1
        if self.bad_steps <= self.tolerated_steps:
            log.warning(
                "non-finite loss or gradients at step %d, its update skipped (%d of %d tolerated)",
                step,
                self.bad_steps,
                self.tolerated_steps,
            )
            return
        kept = self._checkpoint(trainer)
        raise TrainingDiverged(
            f"training diverged: the loss or its gradients were not finite from step "
            f"{self.first_bad_step} to {step} (callbacks.finite_loss.tolerated_steps="
            f"{self.tolerated_steps}), their updates skipped; no export written; "
            f"{f'resume from {kept} (the last good step)' if kept else 'no checkpoint before it'}"
            ": lower optim.lr (or raise trainer.gradient_clip_val)"
        )

    def _checkpoint(self, trainer: L.Trainer) -> str | None:
        """Checkpoint the stopped state (collective) unless its weights are in a checkpoint
        already; returns the newest checkpoint (None when there is none)."""
        savers = [c for c in trainer.checkpoint_callbacks if isinstance(c, FinalCheckpoint)]
        if self.applied_step > max([c.newest_step() for c in savers], default=0):
            for saver in savers:
                saver.save_final(trainer)
        paths = [c.newest_path() for c in savers]
        return next((p for p in paths if p), None)


def _is_deepspeed(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


def is_first_process() -> bool:
    """Whether this process is the run's first (global rank 0, or the process that will start
    the others): the one that takes the run directory's lock."""
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(int(os.environ.get(name, 0)) == 0 for name in ranks)


# What flock raises where the filesystem has no locks (Lustre mounted without `flock`, NFS
# without a lock manager, some FUSE filesystems).
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


class RunDirLock:
    """An exclusive lock on a run directory, held for the life of the process.

    A second run into the same directory is refused with the holder's PID and host. A lock
    left by a run that was killed is released by the kernel with its process, so the next run
    takes it over (and says so). Two cases a cluster adds: on a filesystem without locks the
    run goes on with a warning (unguarded), and a lock held on another node by the same SLURM
    job id is taken over: it is this job's own, left by a node that died (an NFS lock outlives
    its node until the server's lease ends) before the job was requeued onto this one.
    """

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.locked = False
        previous = _read_holder(self.path)
        job_id = slurm_job_id()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except BlockingIOError:
            if not (job_id and previous.get("slurm_job") == job_id and _other_host(previous)):
                os.close(self.fd)
                raise ConfigError(
                    f"{run_dir} is in use by another run (PID {previous.get('pid', '?')} on "
                    f"{previous.get('host', '?')}): wait for it, or pick another hydra.run.dir"
                ) from None
            log.warning(
                "taking over %s from SLURM job %s on %s (PID %s): this job, requeued onto %s; "
                "the old node's lock is left to expire",
                self.path,
                job_id,
                previous.get("host"),
                previous.get("pid"),
                socket.gethostname(),
            )
        except OSError as err:
            if err.errno not in NO_LOCKS:
                os.close(self.fd)
                raise
            log.warning(
                "%s: the filesystem has no file locks (%s): this run goes on, but nothing stops "
                "a second run from writing into the same directory",
                self.path,
                os.strerror(err.errno),
            )
        else:
            if previous:
                log.warning(
                    "taking over %s from PID %s (no longer running)", self.path, previous.get("pid")
                )
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": job_id}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        if self.locked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _other_host(holder: dict) -> bool:
    return holder.get("host") not in (None, socket.gethostname())


def _read_holder(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
