"""Lightning callbacks of a training run (conf/callbacks/): the final step's checkpoint, the HF
export at the end of fit and the preemption checkpoint. The decode evaluation is
`src.training.decode_eval`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from src.config import ConfigError
from src.config.launch import slurm_job_id
from src.model import save_export
from src.training.zero import unpartitioned

log = logging.getLogger(__name__)


class FinalCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, which also checkpoints the step training ends at.

    Saved only every `every_n_train_steps`, a run of 6 steps at interval 4 would end with
    `last.ckpt` at step 4: an export that then fails (a full disk, a kill) would lose the last
    steps, and a rerun would train them again. Here the end of training is saved like a
    periodic checkpoint (kept by `save_top_k`, `last.ckpt` linking to it) before the export
    (`HFExport` calls `save_final` first), so a rerun resumes at the final step, trains
    nothing and only writes the export. The finite-loss guard saves a run it stops the same
    way (`src.training.guards.FiniteLoss`).
    """

    _start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step  # resumed from a checkpoint of this step

    def newest_step(self) -> int:
        """The step of the newest checkpoint: saved by this run or resumed from (0: none)."""
        return max(self._start_step, self._last_global_step_saved)

    def newest_path(self) -> str | None:
        """The checkpoint `last.ckpt` is (links to), if there is one."""
        last = os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        return os.path.realpath(last) if os.path.exists(last) else None

    def save_final(self, trainer: L.Trainer) -> None:
        """Checkpoint the current step unless it is saved already (collective, every rank)."""
        if trainer.global_step == 0 or self._should_skip_saving_checkpoint(trainer):
            return  # also under fast_dev_run, like every checkpoint
        # A fit stopped for preemption has its checkpoint (the one the requeued job resumes
        # from); another of the same step would double the write when time is shortest.
        if any(
            isinstance(c, PreemptionCheckpoint) and c.saved_step == trainer.global_step
            for c in trainer.callbacks
        ):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        # The last step is saved where the periodic ones are (after its batch): there the
        # loop's counters are those a resumed run continues exactly from (saved later, at
        # on_train_end, a run resumed with more steps drifts off the straight curve).
        if trainer.global_step == trainer.max_steps:
            self.save_final(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs that end otherwise (an epoch budget, an early stop) are saved here: a rerun of
        # them trains nothing more, it only exports.
        self.save_final(trainer)
        super().on_train_end(trainer, pl_module)


class HFExport(L.Callback):
    """At the end of fit, write the HF export (model, tokenizer, diffusion.json) to `dirpath`,
    after the final step's checkpoint (`FinalCheckpoint`).

    A run resumed at its last step (its earlier export failed) trains nothing: Lightning then
    skips `on_train_end`, so the export is written at `on_fit_end` instead.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.exported = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, FinalCheckpoint):
                callback.save_final(trainer)
        self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.exported and trainer.fit_loop.done:
            log.info("resumed at step %d, the last: nothing to train", trainer.global_step)
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank enters: gathering ZeRO-3 shards is collective (a no-op otherwise). Rank 0
        # writes from the plain copy, so no DeepSpeed hook runs on one rank alone, and the
        # others wait for it rather than tear down the process group under its feet.
        error: Exception | None = None
        with unpartitioned(pl_module.model) as model:
            if trainer.is_global_zero:
                try:
                    save_export(
                        model, pl_module.tokenizer, pl_module.export_settings(), self.dirpath
                    )
                    log.info("HF export written to %s", self.dirpath)
                except Exception as err:  # raised below, once every rank knows
                    error = err
        # Ranks agree, so a failed write on rank 0 ends every rank (none waits forever).
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            if error is not None:
                raise error
            raise ConfigError(f"writing the export to {self.dirpath} failed on rank 0")
        self.exported = True


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
        self.saved_step: int | None = None  # the step of the checkpoint this run wrote
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
        self.saved_step = trainer.global_step
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
