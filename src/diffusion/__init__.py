"""The block-diffusion method: attention masks (`masks`), the training objective (`loss`) and
its settings (`settings`)."""

from src.diffusion.loss import (
    IGNORE_INDEX,
    ar_loss,
    block_diffusion_logits,
    block_diffusion_loss,
    sample_masked_positions,
)
from src.diffusion.masks import block_causal_allowed, block_diffusion_mask
from src.diffusion.settings import OBJECTIVES, ar_term_from_clean_stream, check_diffusion

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "ar_loss",
    "ar_term_from_clean_stream",
    "block_causal_allowed",
    "block_diffusion_logits",
    "block_diffusion_loss",
    "block_diffusion_mask",
    "check_diffusion",
    "sample_masked_positions",
]
