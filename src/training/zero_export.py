"""HF export of a Lightning DeepSpeed checkpoint of `DiffusionLM` (`python -m src.zero_to_hf`).

The checkpoint is the folder Lightning's DeepSpeedStrategy writes per checkpoint (e.g.
`checkpoints/last.ckpt/`). The model and tokenizer are rebuilt from the run's hyperparameters
saved in it, then the consolidated fp32 weights are loaded and written with `save_pretrained`.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

import torch
from omegaconf import OmegaConf

from src.config import ConfigError
from src.config.files import check_writable
from src.model import build_tokenizer, model_skeleton
from src.training.module import DiffusionLM
from src.training.zero import export_zero_checkpoint

log = logging.getLogger(__name__)


def _checkpoint_client_state(checkpoint_dir: str, tag: str | None) -> dict[str, Any]:
    """What Lightning stored next to the weights (hyperparameters, global step, ...)."""
    made_by = (
        "a DeepSpeed training run writes one per checkpoint (python -m src.train "
        "strategy=deepspeed_zero3 ...: <run dir>/checkpoints/last.ckpt)"
    )
    if not os.path.exists(checkpoint_dir):
        raise ConfigError(f"{checkpoint_dir}: no such DeepSpeed checkpoint folder; {made_by}")
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError(
            f"{checkpoint_dir} is a file, not a DeepSpeed checkpoint folder (a run without "
            f"DeepSpeed writes its own export); {made_by}"
        )
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise ConfigError(
                f"{checkpoint_dir} has no `latest` file: pass --tag <one of its step folders>, "
                "or the checkpoint folder itself (e.g. checkpoints/last.ckpt)"
            )
        with open(latest) as f:
            tag = f.read().strip()
    # `mp_rank_00_model_states.pt`, or `zero_pp_rank_0_mp_rank_00_model_states.pt` (ZeRO-3).
    files = sorted(glob.glob(os.path.join(checkpoint_dir, tag, "*mp_rank_00_model_states.pt")))
    if not files:
        raise ConfigError(f"{checkpoint_dir}/{tag} holds no DeepSpeed model states file")
    # Memory-mapped: under ZeRO-2 this file also holds all 16-bit weights.
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)


def export_lightning_zero_checkpoint(
    checkpoint_dir: str, path: str, tag: str | None = None, dtype: torch.dtype | None = None
) -> None:
    """HF export of a Lightning DeepSpeed checkpoint of `DiffusionLM`, rebuilt from the run's
    saved hyperparameters: the architecture only (the pretrained source's config.json must
    still be reachable; none of its weights is read), the weights from the checkpoint, in
    `dtype` (default float32, the master weights)."""
    check_writable({"export_dir": path})  # before the weights are read, not after
    client = _checkpoint_client_state(checkpoint_dir, tag)
    hparams = dict(client["hyper_parameters"])
    hparams.pop("tokenizer_fingerprint", None)  # recorded by DiffusionLM, not an argument
    tokenizer = build_tokenizer(OmegaConf.create(hparams["model"]))
    module = DiffusionLM(tokenizer, **hparams)
    settings = {**module.export_settings(), "trained_steps": client["global_step"]}
    skeleton = model_skeleton(tokenizer, hparams["model"])
    export_zero_checkpoint(
        checkpoint_dir, skeleton, tokenizer, settings, path, tag=tag, dtype=dtype
    )
    log.info("HF export of %s written to %s", checkpoint_dir, path)
