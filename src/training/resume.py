"""Which checkpoint a training run resumes from, and whether it may.

`ckpt_path=last`: the newest checkpoint of the run directory that loads (`last.ckpt`, the
preemption checkpoint, the periodic ones; a truncated or empty one is skipped, and said so).
A checkpoint trained with other objective settings (block size, objective, its switches) or
another tokenizer is refused unless `allow_resume_changes=true`: the export would claim settings the
weights were not trained with.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.model import tokenizer_fingerprint

log = logging.getLogger(__name__)


def resume_path(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The checkpoint to resume from (None: start afresh), checked against the run."""
    if cfg.ckpt_path != "last":
        path = cfg.ckpt_path
        if path is not None:
            hparams = _hyperparameters(path)
            if hparams is None:
                raise ConfigError(f"ckpt_path={path} does not load: pass another checkpoint")
            _check_same_objective(cfg, tokenizer, path, hparams)
        return path
    for path in _newest_first(cfg.paths.ckpt_dir):
        hparams = _hyperparameters(path)
        if hparams is None:
            log.warning("skipping %s: it does not load (truncated or empty)", path)
            continue
        _check_same_objective(cfg, tokenizer, path, hparams)
        return path
    return None


def _newest_first(ckpt_dir: str) -> list[str]:
    """Every checkpoint of the folder (files, or DeepSpeed's folders), newest first; a link
    (`last.ckpt`) stands for its target, once."""
    paths = {}
    for path in glob.glob(os.path.join(ckpt_dir, "*.ckpt")):
        if os.path.exists(path):
            paths.setdefault(os.path.realpath(path), path)
    return sorted(paths.values(), key=os.path.getmtime, reverse=True)


def _hyperparameters(path: str) -> dict[str, Any] | None:
    """The hyperparameters saved in a checkpoint, None when it does not load. Reads no weights:
    a Lightning file is memory-mapped; of a DeepSpeed folder only the small client-state file
    is read."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "latest")) as f:
                tag = f.read().strip()
            states = glob.glob(os.path.join(path, tag, "*mp_rank_00_model_states.pt"))
            # Memory-mapped: under ZeRO-2 this file also holds all 16-bit weights.
            state = torch.load(states[0], map_location="cpu", weights_only=False, mmap=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(state["hyper_parameters"])
    except Exception:  # any way a checkpoint can be broken: all mean "does not load"
        return None


def _check_same_objective(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, path: str, hparams: Mapping[str, Any]
) -> None:
    if cfg.get("allow_resume_changes", False):
        return
    run = OmegaConf.to_container(cfg, resolve=True)
    differ = [
        f"diffusion.{k}={v!r} (this run: {run['diffusion'].get(k)!r})"
        for k, v in hparams.get("diffusion", {}).items()
        if run["diffusion"].get(k) != v
    ]
    saved = hparams.get("tokenizer_fingerprint")
    if saved is not None and saved != tokenizer_fingerprint(tokenizer):
        differ.append("another tokenizer")
    if differ:
        raise ConfigError(
            f"{path} was trained with {'; '.join(differ)}: start another run directory "
            "(hydra.run.dir=...), or resume anyway with allow_resume_changes=true"
        )
