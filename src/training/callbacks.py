"""Lightning callbacks of a training run (conf/callbacks/): the HF export at the end of fit and
the preemption checkpoint. The decode evaluation is `src.training.decode_eval`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading

import lightning as L

from src.config.launch import slurm_job_id
from src.model import save_export
from src.training.zero import unpartitioned

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """At the end of fit, write the HF export (model, tokenizer, diffusion.json) to `dirpath`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank enters: gathering ZeRO-3 shards is collective (a no-op otherwise). Rank 0
        # writes from the plain copy, so no DeepSpeed hook runs on one rank alone, and the
        # others wait for it rather than tear down the process group under its feet.
        with unpartitioned(pl_module.model) as model:
            if trainer.is_global_zero:
                settings = pl_module.export_settings()
                save_export(model, pl_module.tokenizer, settings, self.dirpath)
                log.info("HF export written to %s", self.dirpath)
        trainer.strategy.barrier("hf_export")


class PreemptionCheckpoint(L.Callback):
    """On SLURM's pre-timeout signal: checkpoint at the next step boundary, then requeue.

    Lightning's own handler saves from inside the signal handler, wherever the loop happens to
    be, so the loop counters saved can be one step off the weights and a resumed run diverges.
    This one only records the signal; the checkpoint is written at the end of the training batch
    that completes an optimizer step (the last micro-batch of a gradient-accumulation window),
    where a periodic checkpoint would be. Mid-window, the accumulated gradients are in no
    checkpoint, and DeepSpeed (which restores its step count but not its micro-step count) and
    Lightning (which restores its batch count) would disagree about where the next step ends.
    So the requeued job (same run directory, `ckpt_path=last`) resumes exactly. Lead time: up to
    one optimizer step plus the checkpoint write (`python -m src.plan` estimates both; the SLURM
    launcher checks `signal_delay_s` against them). Outside SLURM it checkpoints and stops the
    fit. Once a newer periodic checkpoint exists, the preemption checkpoint is deleted: it is
    not kept beside the retained ones (a ZeRO-3 checkpoint of a 7B model is ~100 GB).
    """

    FILENAME = "preempted.ckpt"

    def __init__(self, dirpath: str, signal_name: str = "SIGUSR1") -> None:
        self.dirpath = dirpath
        self.signum = getattr(signal, signal_name)
        self.signalled = False
        self._step_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Registered after Lightning's signal connector, so it replaces its SLURM handler;
        # Lightning restores the original handlers at teardown.
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.signalled = True

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object
    ) -> None:
        if trainer.is_global_zero:
            self._drop_if_superseded()
        # The optimizer stepped in this batch (under every strategy alike) only at the end of
        # an accumulation window: every rank is at the same boundary.
        if trainer.global_step == self._step_at_start:
            return
        # Ranks may get the signal at different batches: they agree before anyone saves.
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        self.signalled = False
        path = os.path.join(self.dirpath, self.FILENAME)
        trainer.save_checkpoint(path)
        job_id = slurm_job_id()
        if job_id is None:
            log.warning(
                "signal %d: checkpoint %s written at step %d, stopping",
                self.signum,
                path,
                trainer.global_step,
            )
            trainer.should_stop = True
        elif trainer.is_global_zero:
            log.warning(
                "signal %d: checkpoint %s written at step %d, requeueing job %s",
                self.signum,
                path,
                trainer.global_step,
                job_id,
            )
            subprocess.run(["scontrol", "requeue", job_id], check=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._drop_if_superseded()

    def _drop_if_superseded(self) -> None:
        path, last = (
            os.path.join(self.dirpath, self.FILENAME),
            os.path.join(self.dirpath, "last.ckpt"),
        )
        if (
            os.path.exists(path)
            and os.path.exists(last)
            and os.path.getmtime(last) > os.path.getmtime(path)
        ):
            log.info("%s superseded by %s: deleted", path, os.path.realpath(last))
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
