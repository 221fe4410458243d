"""The objective's settings (`conf/diffusion/`): what a run may ask of the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from src.config import ConfigError

OBJECTIVES = ("block_diffusion", "ar")


def check_diffusion(diffusion: Mapping[str, Any]) -> None:
    """ConfigError naming the `diffusion.*` key of a setting the loss cannot run with.
    (The block size is checked with the context length: `src.data.sft.check_lengths`.)"""
    if diffusion["objective"] not in OBJECTIVES:
        raise ConfigError(
            f"diffusion.objective={diffusion['objective']!r}: choose block_diffusion or ar"
        )
