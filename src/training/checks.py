"""Every compose-time check of a training run: each is one line that names the key to fix,
raised before anything is loaded. The rules live with what they configure."""

from __future__ import annotations

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig

from src.config import ConfigError
from src.data.sft import check_lengths
from src.decoding import DecodeSettings
from src.diffusion import check_diffusion
from src.model import check_model_source


def is_deepspeed(strategy: DictConfig | str | None) -> bool:
    """Whether a `trainer.strategy` config selects Lightning's DeepSpeedStrategy."""
    if isinstance(strategy, str):
        return strategy.startswith("deepspeed")
    if strategy is None or "_target_" not in strategy:
        return False
    return issubclass(get_class(strategy._target_), DeepSpeedStrategy)


def check_strategy(trainer: DictConfig) -> None:
    """DeepSpeed needs CUDA: Lightning refuses it on CPU, but only after loading everything."""
    if not is_deepspeed(trainer.strategy):
        return
    if trainer.accelerator == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            f"a DeepSpeed strategy needs CUDA GPUs (accelerator={trainer.accelerator}, "
            f"CUDA available: {torch.cuda.is_available()}): use strategy=ddp on CPU"
        )


def check_train(cfg: DictConfig) -> None:
    """All compose-time checks of a training run."""
    check_diffusion(cfg.diffusion)
    check_lengths(cfg.data.seq_len, cfg.diffusion.block_size)
    DecodeSettings.resolve(cfg.decode, cfg.diffusion.block_size)
    check_model_source(cfg.model)
    check_strategy(cfg.trainer)
