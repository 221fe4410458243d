"""What keeps a training run's work safe: a loss that stops being finite ends the run (and its
checkpoints from then on are removed), and a run directory has one run at a time. (Output
folders are checked before anything loads: `src.config.files.check_writable`.)"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from src.config import ConfigError
from src.config.launch import slurm_job_id

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message is one line that says what to change."""


class FiniteLoss(L.Callback):
    """Stop the run when the training loss has not been finite for more than
    `tolerated_steps` optimizer steps in a row (ranks agree: any rank's non-finite loss counts).

    The run then raises `TrainingDiverged`: no HF export is written (that happens only at the
    end of a completed fit), and checkpoints saved since the first non-finite step are deleted,
    `last.ckpt` linking to the newest one left, so a resume starts from the last good weights.
    """

    def __init__(self, tolerated_steps: int = 0) -> None:
        if tolerated_steps < 0:
            raise ConfigError(
                f"callbacks.finite_loss.tolerated_steps={tolerated_steps} must be >= 0"
            )
        self.tolerated_steps = tolerated_steps
        self.first_bad_step: int | None = None
        self.bad_steps = 0
        self.weights_step = 0
        self._step_finite = True  # every micro-batch loss of the current step so far

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        # The weights this batch's loss comes from are the checkpoint of this step.
        self.weights_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, *args: object
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        self._step_finite &= loss is not None and bool(torch.isfinite(loss.detach()).all())
        # Judged per optimizer step: at the batch that made it (the end of an accumulation
        # window), when every rank is at the same boundary.
        if trainer.global_step == self.weights_step:
            return
        finite, self._step_finite = self._step_finite, True
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.first_bad_step, self.bad_steps = None, 0
            return
        if self.first_bad_step is None:
            # A step's update can break the weights while its own loss was still finite: the
            # weights behind the first non-finite loss (and any saved since) are not good.
            self.first_bad_step = self.weights_step
        self.bad_steps += 1
        if self.bad_steps <= self.tolerated_steps:
            log.warning(
                "non-finite loss at step %d (%d tolerated)",
                trainer.global_step,
                self.tolerated_steps,
            )
            return
        kept = (
            _drop_checkpoints_since(trainer, self.first_bad_step)
            if trainer.is_global_zero
            else None
        )
        raise TrainingDiverged(
            f"training diverged: the loss was not finite from step {self.first_bad_step} to "
            f"{trainer.global_step} (callbacks.finite_loss.tolerated_steps={self.tolerated_steps}); "
            f"no export written; {f'resume from {kept}' if kept else 'no checkpoint before it'}: "
            "lower optim.lr (or raise trainer.gradient_clip_val)"
        )


def _drop_checkpoints_since(trainer: L.Trainer, step: int) -> str | None:
    """Delete the periodic checkpoints saved at or after `step` and point `last.ckpt` at the
    newest one left; returns it (None when none is left)."""
    kept = None
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
            continue
        for path, score in list(callback.best_k_models.items()):
            if int(score) >= step:
                _remove(path)
                del callback.best_k_models[path]
                log.warning("deleted %s: saved after the loss stopped being finite", path)
        if callback.best_k_models:
            kept = max(callback.best_k_models, key=lambda p: int(callback.best_k_models[p]))
        last = os.path.join(callback.dirpath, "last.ckpt")
        if os.path.islink(last) or os.path.exists(last):
            _remove(last)
            if kept:
                os.symlink(os.path.relpath(kept, callback.dirpath), last)
    return kept


def _remove(path: str) -> None:
    """A checkpoint: a file, a link, or (DeepSpeed) a folder."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


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
