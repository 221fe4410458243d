"""The KV cache of cached parallel decoding: a buffer indexed by absolute position.

Slot p of row i holds the keys and values of position p of sequence i. Every forward writes
the keys/values of its query tokens into their slots before attention (`plan` says where), so
a denoising step writes draft keys for the current block and the commit pass overwrites them
with the exact ones: the cache never has to be cropped or copied. `attention_inputs` puts a
rule over (row, query, slot) in the form the model's attention backend takes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

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


Rule = Callable[[Tensor, Tensor, Tensor], Tensor]


def attention_inputs(
    model: PreTrainedModel, allowed: Rule | None, rows: int, q_len: int, kv_len: int
) -> dict[str, Any]:
    """The attention keyword arguments of a forward of `q_len` queries over slots
    `[0, kv_len)`, under `allowed(row, query index, slot) -> bool` (broadcastable index
    tensors; per-row state is indexed by `row` only, see below), in the form the model's
    attention backend takes:

    - `allowed` None (every query sees every slot: e.g. one row denoising its block): no mask
      at all, and `is_causal=False`. SDPA then runs its fused kernels and, on CUDA, native
      grouped-query attention (transformers passes `enable_gqa` only without a mask; with one
      it copies the keys/values of every KV head for each query head, `repeat_kv`).
    - `sdpa`: a bool `[rows, 1, q, kv]` mask (True: attend), which SDPA takes as it is;
    - `eager`: a float additive mask (eager adds a bool mask to the scores: silently wrong);
    - `flex_attention`: a BlockMask. Its `mask_mod` reads per-row tensors by row only:
      indexing them by query too makes inductor's CPU flex template emit C++ that does not
      compile (torch 2.13).
    """
    implementation = model.config._attn_implementation
    if allowed is None and implementation != "flex_attention" and takes_mask_mapping(model):
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        # A dict is taken as the prepared per-layer-type masks: transformers builds none.
        return {"attention_mask": dict.fromkeys(layer_types), "is_causal": False}
    rule = allowed if allowed is not None else lambda b, q, kv: kv >= 0
    device = model.device
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return rule(b, q, kv)

        mask = create_block_mask(mask_mod, rows, None, q_len, kv_len, device=device)
        return {"attention_mask": mask}
    b = torch.arange(rows, device=device)[:, None, None]
    q = torch.arange(q_len, device=device)[None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, :]
    dense = rule(b, q, kv).expand(rows, q_len, kv_len)  # [n, q, kv]
    if implementation == "sdpa":
        return {"attention_mask": dense[:, None]}
    return {"attention_mask": additive_mask(dense, model.dtype)}  # [n, 1, q, kv]


def takes_mask_mapping(model: PreTrainedModel) -> bool:
    """Whether the model's base forward takes prepared masks per layer type (a dict; None: no
    mask), as transformers 5's Qwen2 does. Others (e.g. Llama) build a causal mask from
    anything but a 4D one, so they get an explicit mask even where every slot is allowed."""
    return _takes_mask_mapping(type(model.base_model))


@functools.cache
def _takes_mask_mapping(model_class: type) -> bool:
    return "attention_mask, dict)" in inspect.getsource(model_class.forward)


def block_causal(q_pos: Tensor, block_size: int) -> Rule:
    """SPEC section 3's rule for rows whose queries sit at `q_pos[row] + query index`
    (`q_pos` `[n]`): a query sees the slots of its own block and of every earlier one."""
    return lambda b, q, kv: block_causal_allowed(q_pos[b] + q, kv, block_size)
