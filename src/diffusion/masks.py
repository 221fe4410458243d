"""Attention masks of the block-diffusion method (SPEC sections 2 and 3).

Every mask here is one rule over (query index, key index), written once as tensor arithmetic
so that the same function builds the dense mask (for `sdpa`/`eager`) and the `mask_mod` of a
flex-attention BlockMask. True means "the query may attend the key".

Training layout, length (V + 1) * L: ``[x_t view 1, ..., x_t view V, x_0]``. With
blk(i) = (i mod L) // B, the mask is the union of three named parts (after bd3lms):

- block-diagonal:       x_t query of block b -> keys of block b of the *same* view
                        (bidirectional inside the block; views never see each other);
- offset block-causal:  x_t query of block b -> x_0 keys of blocks < b;
- block-causal:         x_0 query of block b -> x_0 keys of blocks <= b
  (`context="block_causal"`, the paper's), or in its place
- causal:               x_0 query i -> x_0 keys <= i (`context="causal"`, SPEC 6's one-cache
                        variant: the clean stream is the AR model's own forward).

Inference (decoding) is block-causal over absolute positions: a token sees every token of
its own block and of all earlier blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Additive masks use the dtype's most negative finite value, not -inf: a fully masked
# row (padding) then stays finite instead of turning into NaN after softmax.


def block_diffusion_allowed(
    q: Tensor,
    k: Tensor,
    seq_len: int,
    block_size: int,
    num_views: int,
    context: str = "block_causal",
) -> Tensor:
    """The training rule for query indices `q` and key indices `k` (broadcastable)."""
    q_view, k_view = q // seq_len, k // seq_len
    q_block, k_block = (q % seq_len) // block_size, (k % seq_len) // block_size
    q_clean, k_clean = q_view == num_views, k_view == num_views
    block_diagonal = ~q_clean & (q_view == k_view) & (q_block == k_block)
    offset_block_causal = ~q_clean & k_clean & (k_block < q_block)
    if context == "causal":
        clean = q_clean & k_clean & (k % seq_len <= q % seq_len)
    else:
        clean = q_clean & k_clean & (k_block <= q_block)  # block-causal
    return block_diagonal | offset_block_causal | clean


def block_diffusion_mask(
    seq_len: int, block_size: int, num_views: int = 1, context: str = "block_causal"
) -> Tensor:
    """Bool mask `[(V+1)L, (V+1)L]`, laid out ``[x_t view 1, ..., x_t view V, x_0]``."""
    n = (num_views + 1) * seq_len
    idx = torch.arange(n)
    return block_diffusion_allowed(
        idx[:, None], idx[None, :], seq_len, block_size, num_views, context
    )


def block_causal_allowed(q_pos: Tensor, k_pos: Tensor, block_size: int) -> Tensor:
    """The inference rule on absolute positions: key block <= query block."""
    return (k_pos // block_size) <= (q_pos // block_size)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool `[..., q, k]` -> float `[..., 1, q, k]` with 0 where allowed (HF 4D mask form)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(-3)


def block_diffusion_attention(
    seq_len: int,
    block_size: int,
    num_views: int,
    *,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
    context: str = "block_causal",
) -> object:
    """The training mask in the form the model's attention backend expects.

    `flex_attention` takes a BlockMask (a dense mask crashes it); every other backend takes a
    float additive `[1, 1, n, n]` mask (a bool mask is silently wrong with `eager`).
    """
    n = (num_views + 1) * seq_len
    if implementation == "flex_attention":
        return _flex_mask(
            lambda q, k: block_diffusion_allowed(q, k, seq_len, block_size, num_views, context),
            n,
            device,
        )
    allowed = block_diffusion_mask(seq_len, block_size, num_views, context).to(device)
    return additive_mask(allowed, dtype).unsqueeze(0)


def causal_attention(seq_len: int, *, implementation: str, device: torch.device) -> object:
    """The plain causal rule for a forward of x_0 (the AR loss): None, transformers' own mask,
    except for `flex_attention`, which gets an explicit BlockMask: the one transformers builds
    fails to compile on CPU (torch 2.13) once a block-diffusion forward ran in the process."""
    if implementation != "flex_attention":
        return None
    return _flex_mask(lambda q, k: k <= q, seq_len, device)


def _flex_mask(allowed: Callable[[Tensor, Tensor], Tensor], n: int, device: torch.device) -> object:
    """A flex-attention BlockMask `[n, n]` of the rule `allowed(q, k)`, shared by batch and heads."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return allowed(q, k)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
