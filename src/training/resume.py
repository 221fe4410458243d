"""Which checkpoint a training run resumes from."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from src.training.callbacks import PreemptionCheckpoint


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: the newest of this run's `last.ckpt` and the checkpoint written when
    SLURM signalled a preemption (`PreemptionCheckpoint`); any other value as given."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    names = ("last.ckpt", PreemptionCheckpoint.FILENAME)
    candidates = [os.path.join(cfg.paths.ckpt_dir, name) for name in names]
    return max(filter(os.path.exists, candidates), key=os.path.getmtime, default=None)
