"""The objective's settings (`conf/diffusion/`): what a run may ask of the loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from src.config import ConfigError

OBJECTIVES = ("block_diffusion", "ar")
MASKINGS = ("uniform", "position_dependent")
SECOND_VIEWS = ("complement", "resample")
# What the clean stream x_0 attends in training, and so the committed context at inference
# (SPEC 6): block-causally (the paper's), or causally (the one-cache variant).
CONTEXTS = ("block_causal", "causal")


def check_context(context: object, key: str = "diffusion.context") -> None:
    """ConfigError unless `context` names a context of SPEC 6."""
    if context not in CONTEXTS:
        raise ConfigError(f"{key}={context!r}: choose {' or '.join(CONTEXTS)}")


def ar_term_from_clean_stream(diffusion: Mapping[str, Any]) -> bool:
    """Whether the AR term comes from the clean stream's logits of the block-diffusion
    forward (SPEC 6's one-cache variant), not from a causal forward of its own."""
    return diffusion.get("ar_weight", 0.0) > 0 and diffusion.get("context") == "causal"


def check_diffusion(diffusion: Mapping[str, Any]) -> None:
    """ConfigError naming the `diffusion.*` key of a setting the loss cannot run with.
    (The block size is checked with the context length: `src.data.sft.check_lengths`.)"""
    if diffusion["objective"] not in OBJECTIVES:
        raise ConfigError(
            f"diffusion.objective={diffusion['objective']!r}: choose block_diffusion or ar"
        )
    # The options of SPEC section 5 (absent from configs older than them: the paper's recipe).
    masking = diffusion.get("masking", "uniform")
    if masking not in MASKINGS:
        raise ConfigError(f"diffusion.masking={masking!r}: choose {' or '.join(MASKINGS)}")
    tilt = diffusion.get("masking_tilt", 0.0)
    if not 0.0 <= tilt <= 1.0:
        raise ConfigError(f"diffusion.masking_tilt={tilt} must be in [0, 1] (0: the paper's)")
    second = diffusion.get("masking_second_view", "complement")
    if second not in SECOND_VIEWS:
        raise ConfigError(
            f"diffusion.masking_second_view={second!r}: choose {' or '.join(SECOND_VIEWS)}"
        )
    weight = diffusion.get("distill_weight", 0.0)
    if weight < 0:
        raise ConfigError(f"diffusion.distill_weight={weight} must be >= 0 (0: no distillation)")
    temperature = diffusion.get("distill_temperature", 1.0)
    if not temperature > 0:
        raise ConfigError(f"diffusion.distill_temperature={temperature} must be > 0")
    if weight > 0 and diffusion["objective"] == "ar":
        raise ConfigError(
            "diffusion.distill_weight > 0 distils into a block-diffusion model: "
            "set diffusion.objective=block_diffusion, or distill_weight=0"
        )
    check_context(diffusion.get("context", "block_causal"))
    ar_weight = diffusion.get("ar_weight", 0.0)
    if ar_weight < 0:
        raise ConfigError(f"diffusion.ar_weight={ar_weight} must be >= 0 (0: no AR term)")
    if ar_weight > 0 and diffusion["objective"] == "ar":
        raise ConfigError(
            "diffusion.ar_weight > 0 adds an AR term to the block-diffusion loss: "
            "set diffusion.objective=block_diffusion, or ar_weight=0"
        )
