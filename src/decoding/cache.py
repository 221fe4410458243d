"""The KV cache of cached parallel decoding: a buffer indexed by absolute position.

Slot p of row i holds the keys and values of position p of sequence i. Every forward writes
the keys/values of its query tokens into their slots before attention (`plan` says where), so
a denoising step writes draft keys for the current block and the commit pass overwrites them
with the exact ones: the cache never has to be cropped or copied. `attention_mask` is the
block-causal rule over the slots, in the form the model's attention backend takes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from src.diffusion.masks import additive_mask, block_causal_allowed


class PositionLayer(CacheLayerMixin):
    """One layer's keys/values `[rows, kv_heads, length, head_dim]`, slot = absolute position."""

    is_sliding = False

    def __init__(self, cache: PositionCache) -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        rows, heads, _, _ = key_states.shape
        length = self.cache.length
        self.keys = key_states.new_zeros(rows, heads, length, key_states.shape[-1])
        self.values = value_states.new_zeros(rows, heads, length, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        rows, slots, write = cache.rows, cache.slots, cache.write  # [n, 1], [n, q], [n, q] | None
        new_k, new_v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [n, q, h, d]
        if write is not None:
            keep = ~write[..., None, None]
            new_k = torch.where(keep, self.keys[rows, :, slots], new_k)
            new_v = torch.where(keep, self.values[rows, :, slots], new_v)
        self.keys[rows, :, slots] = new_k
        self.values[rows, :, slots] = new_v
        return self.keys[:, :, : cache.kv_len], self.values[:, :, : cache.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.kv_len, 0

    def get_seq_length(self) -> int:
        return self.cache.kv_len

    def get_max_length(self) -> int:
        return self.cache.length

    def select_rows(self, keep: Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[keep], self.values[keep]


class PositionCache(Cache):
    """KV cache addressed by absolute position; `plan` says where the next forward writes."""

    def __init__(self, num_layers: int, length: int) -> None:
        self.length = length
        self.rows = self.slots = self.write = None
        self.kv_len = 0
        super().__init__(layers=[PositionLayer(self) for _ in range(num_layers)])

    def plan(self, slots: Tensor, write: Tensor | None, kv_len: int) -> None:
        """The next forward's query tokens sit at `slots` `[n, q]` (= their positions); rows
        write only where `write` `[n, q]` is True (None: everywhere); attention sees slots
        `[0, kv_len)`."""
        self.rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.slots, self.write, self.kv_len = slots, write, kv_len

    def select_rows(self, keep: Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(keep)


def attention_mask(
    model: PreTrainedModel, q_pos: Tensor | None, q_len: int, kv_len: int, block_size: int
) -> object:
    """Block-causal attention over slots `[0, kv_len)` of `q_len` queries, in the form the
    model's attention backend takes (flex: a BlockMask; others: a float additive mask).

    `q_pos` `[n, 1]` is the position of each row's current block, which all its queries share;
    None means the queries sit at positions `[0, q_len)` (prefill, the same for every row).
    """
    if model.config._attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        # The rule reads q_pos by row only: indexing it by query too makes inductor's CPU
        # flex template emit C++ that does not compile (torch 2.13).
        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return block_causal_allowed(q if q_pos is None else q_pos[b, 0], kv, block_size)

        rows = None if q_pos is None else q_pos.shape[0]
        device = model.device
        return create_block_mask(mask_mod, rows, None, q_len, kv_len, device=device)
    device = model.device if q_pos is None else q_pos.device
    if q_pos is None:
        q_pos = torch.arange(q_len, device=device)[None]  # [1, q]
    k_pos = torch.arange(kv_len, device=device)
    allowed = block_causal_allowed(q_pos[..., None], k_pos, block_size)  # [n | 1, q | 1, kv]
    return additive_mask(allowed, model.dtype)  # [n | 1, 1, q | 1, kv]
