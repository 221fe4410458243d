"""Config validation at compose time: every check here runs before anything is loaded.

Each failure is one line that names the key to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf

from src.errors import ConfigError
from src.model import is_local_path, package_path


def validate_diffusion(diffusion: DictConfig, seq_len: int | None = None) -> None:
    block_size = diffusion.block_size
    if block_size < 1:
        raise ConfigError(f"diffusion.block_size={block_size} must be >= 1")
    if seq_len is not None and seq_len % block_size:
        raise ConfigError(
            f"data.seq_len={seq_len} is not a multiple of diffusion.block_size={block_size}: "
            f"use e.g. data.seq_len={max(1, seq_len // block_size) * block_size}"
        )
    if diffusion.objective not in ("block_diffusion", "ar"):
        raise ConfigError(
            f"diffusion.objective={diffusion.objective!r}: choose block_diffusion or ar"
        )


def validate_decode(decode: DictConfig) -> None:
    if decode.block_size < 1:
        raise ConfigError(f"decode.block_size={decode.block_size} must be >= 1")
    if decode.sub_block_size < 1 or decode.block_size % decode.sub_block_size:
        raise ConfigError(
            f"decode.sub_block_size={decode.sub_block_size} must divide "
            f"decode.block_size={decode.block_size} (e.g. 4, 8 or 16 for 32)"
        )
    if not 0.0 <= decode.threshold <= 1.0:
        raise ConfigError(
            f"decode.threshold={decode.threshold} must be in [0, 1] (1.0 = one token per step)"
        )


DECODERS = ("diffusion", "ar")
# The keys of a decode config that `generate` takes.
GENERATE_KEYS = (
    "block_size",
    "sub_block_size",
    "threshold",
    "max_new_tokens",
    "use_sub_block_cache",
    "temperature",
    "top_p",
)


def resolve_decode(decode: Mapping[str, Any], trained_block_size: int) -> dict[str, Any]:
    """The decode config as a plain dict, `block_size` defaulting to the trained one.

    SPEC section 3: decoding with another block size than the trained one hurts, so an
    explicit mismatch is an error unless `allow_block_size_mismatch` (the Table 4 ablation).
    """
    decode = (
        dict(OmegaConf.to_container(decode, resolve=True))
        if isinstance(decode, DictConfig)
        else dict(decode)
    )
    decode.setdefault("allow_block_size_mismatch", False)
    if decode.get("block_size") is None:
        decode["block_size"] = trained_block_size
    elif decode["block_size"] != trained_block_size and not decode["allow_block_size_mismatch"]:
        raise ConfigError(
            f"decode.block_size={decode['block_size']} differs from the trained block size "
            f"{trained_block_size}: drop it, or set decode.allow_block_size_mismatch=true"
        )
    validate_decode(OmegaConf.create(decode))
    return decode


def validate_model_source(model: DictConfig) -> None:
    pretrained = model.get("pretrained")
    if pretrained is None:
        if model.get("config") is None:
            raise ConfigError("model.pretrained and model.config are both null: set one")
        return
    if is_local_path(pretrained) and not os.path.exists(os.path.expanduser(pretrained)):
        producer = model.get("produced_by")
        hint = f": it is made by `{producer}`" if producer else ": set model.pretrained"
        raise ConfigError(f"model.pretrained={pretrained} does not exist{hint}")


def is_deepspeed(strategy: DictConfig | str | None) -> bool:
    """Whether a `trainer.strategy` config selects Lightning's DeepSpeedStrategy."""
    if isinstance(strategy, str):
        return strategy.startswith("deepspeed")
    if strategy is None or "_target_" not in strategy:
        return False
    return issubclass(get_class(strategy._target_), DeepSpeedStrategy)


def validate_strategy(trainer: DictConfig) -> None:
    """DeepSpeed needs CUDA: Lightning refuses it on CPU, but only after loading everything."""
    if not is_deepspeed(trainer.strategy):
        return
    if trainer.accelerator == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            f"a DeepSpeed strategy needs CUDA GPUs (accelerator={trainer.accelerator}, "
            f"CUDA available: {torch.cuda.is_available()}): use strategy=ddp on CPU"
        )


def validate_train(cfg: DictConfig) -> None:
    """All compose-time checks of a training run."""
    validate_diffusion(cfg.diffusion, cfg.data.seq_len)
    validate_decode(cfg.decode)
    validate_model_source(cfg.model)
    validate_strategy(cfg.trainer)


OmegaConf.register_new_resolver("package_path", package_path, replace=True)
