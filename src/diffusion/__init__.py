"""The block-diffusion method: attention masks (`masks`) and the training objective (`loss`)."""

from src.diffusion.loss import (
    IGNORE_INDEX,
    ar_loss,
    block_diffusion_logits,
    block_diffusion_loss,
    sample_masked_positions,
)
from src.diffusion.masks import block_causal_allowed, block_diffusion_mask

__all__ = [
    "IGNORE_INDEX",
    "ar_loss",
    "block_causal_allowed",
    "block_diffusion_logits",
    "block_diffusion_loss",
    "block_diffusion_mask",
    "sample_masked_positions",
]
