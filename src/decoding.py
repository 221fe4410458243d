"""Cached parallel decoding of a block-diffusion LM (SPEC section 3), and the AR baseline.

`generate` decodes blocks of `block_size` tokens left to right. Inside a block, masked
positions are filled sub-block by sub-block: each step forwards the current block against the
block-level KV cache, scores every masked position of the sub-block with the logit of the
position before it (the AR token shift), and unmasks all positions whose confidence exceeds
`threshold` (at least the most confident one). A finished block is forwarded once more to store
its exact keys/values; the argmax of its last logit starts the next block.

Design, so that batched decoding is exact (each sequence gets the tokens it gets alone):

- The KV cache is a buffer indexed by *absolute position*: slot p of row i holds the keys and
  values of position p of sequence i. Blocks are aligned to absolute positions per sequence,
  so no padding is needed: a row attends slots ``< end of its current block`` (the
  block-causal rule of `block_causal_allowed`), and every slot below that is a real token.
- Every forward writes the keys/values of its query tokens into their slots before attention.
  So a denoising step writes draft keys for the current block, and the commit pass overwrites
  them with the exact ones: the cache never has to be cropped or copied.
- Rows progress independently. One forward serves all active rows, whatever each is doing
  (denoising some sub-block, or committing its block); per-row position ids, slots and logit
  positions (`logits_to_keep` as a `[rows, k]` tensor) keep their math separate. Finished rows
  leave the batch (the buffer is compacted once per finishing event).
- Sub-block cache ("DualCache", a switch): the whole block is forwarded (refreshing its keys)
  on a block's first step and while the sub-block's first position is masked (as the released
  code does); other steps forward only the sub-block, reusing the stale keys of the rest of
  the block. When rows disagree on which forward they need, the whole block is run and
  rows in sub-block mode write only their sub-block's slots, which gives them exactly the
  attention inputs of a sub-block-only forward.

Example::

    result = generate(model, [ids], mask_token_id=mask_id, stop_token_id=stop_id,
                      block_size=32, sub_block_size=8, threshold=0.9, max_new_tokens=256)
    result.tokens[0], result.forwards, result.tokens_per_second
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import Cache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from src.diffusion.masks import additive_mask, block_causal_allowed


@dataclass
class GenerationResult:
    """What a decode produced and what it cost.

    `tokens[i]` is the continuation of prompt i: it ends at (and includes) the stop token when
    one was produced and holds at most `max_new_tokens` ids. `forwards` counts model forward
    calls (prefill included; a batched forward counts once). `unmasked_per_step[i]` lists, for
    each denoising step of sequence i, how many positions it unmasked (AR steps not included).
    """

    tokens: list[list[int]]
    forwards: int
    seconds: float
    unmasked_per_step: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_forward(self) -> float:
        return self.num_tokens / self.forwards if self.forwards else 0.0

    @property
    def denoising_steps(self) -> int:
        """Denoising steps summed over sequences."""
        return sum(len(s) for s in self.unmasked_per_step)


class _PositionLayer(CacheLayerMixin):
    """One layer's keys/values `[rows, kv_heads, length, head_dim]`, slot = absolute position."""

    is_sliding = False

    def __init__(self, cache: _PositionCache) -> None:
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


class _PositionCache(Cache):
    """KV cache addressed by absolute position; `plan` says where the next forward writes."""

    def __init__(self, num_layers: int, length: int) -> None:
        self.length = length
        self.rows = self.slots = self.write = None
        self.kv_len = 0
        super().__init__(layers=[_PositionLayer(self) for _ in range(num_layers)])

    def plan(self, slots: Tensor, write: Tensor | None, kv_len: int) -> None:
        """The next forward's query tokens sit at `slots` `[n, q]` (= their positions); rows
        write only where `write` `[n, q]` is True (None: everywhere); attention sees slots
        `[0, kv_len)`."""
        self.rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        self.slots, self.write, self.kv_len = slots, write, kv_len

    def select_rows(self, keep: Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(keep)


def _attention_mask(
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


def _choose(
    logits: Tensor,
    mask_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Token and its confidence per position: `[..., V]` -> `[...]`, `[...]`.

    Greedy: argmax and its softmax probability. Sampling: a draw from the temperature-scaled,
    top-p-truncated distribution and its (renormalised) probability. The mask token is
    excluded before the softmax, so it is never emitted.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits[..., mask_token_id] = -torch.inf
    if temperature == 0:
        confidence, tokens = logits.softmax(-1).max(-1)
        return tokens, confidence
    probs = (logits / temperature).softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0)
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def _vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _validate_prompts(model: PreTrainedModel, prompt_ids: list[list[int]]) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token-id lists")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompt_ids)
    if context is not None and longest > context:
        raise ValueError(
            f"a prompt has {longest} tokens, more than the model's context ({context}): shorten it"
        )
    vocab = _vocab_size(model)
    if any(not 0 <= t < vocab for p in prompt_ids for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) (the model's vocabulary)")


def _validate(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    mask_token_id: int,
    stop_token_id: int,
    block_size: int,
    sub_block_size: int,
    threshold: float,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> None:
    if block_size < 1 or sub_block_size < 1 or block_size % sub_block_size:
        raise ValueError(
            f"sub_block_size ({sub_block_size}) must be >= 1 and divide block_size ({block_size})"
        )
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (>= 1 means one token per step), got {threshold}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    vocab = _vocab_size(model)
    if not 0 <= mask_token_id < vocab:
        raise ValueError(
            f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab}): "
            "add the mask token to the tokenizer and resize the embeddings"
        )
    if not 0 <= stop_token_id < vocab or stop_token_id == mask_token_id:
        raise ValueError(
            f"stop_token_id {stop_token_id} must be a vocabulary id other than the mask"
        )
    _validate_prompts(model, prompt_ids)


def generate(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    mask_token_id: int,
    stop_token_id: int,
    block_size: int,
    sub_block_size: int,
    threshold: float,
    max_new_tokens: int,
    use_sub_block_cache: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Cached parallel block-diffusion decoding of a batch of prompts (any lengths).

    `threshold`: unmask every masked position of the sub-block whose confidence exceeds it,
    and at least the most confident one (>= 1: one token per step; 0: a sub-block per step).
    `use_sub_block_cache`: reuse the block's stale keys/values while a sub-block is decoded
    (an approximation; exact when `sub_block_size == block_size`). `temperature > 0` samples
    every token (AR steps too) with top-p truncation, drawing from `generator`.
    Raises ValueError on bad arguments before any forward.
    """
    _validate(
        model,
        prompt_ids,
        mask_token_id=mask_token_id,
        stop_token_id=stop_token_id,
        block_size=block_size,
        sub_block_size=sub_block_size,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    decoder = _BlockDecoder(
        model,
        mask_token_id=mask_token_id,
        stop_token_id=stop_token_id,
        block_size=block_size,
        sub_block_size=sub_block_size,
        threshold=threshold,
        use_sub_block_cache=use_sub_block_cache,
        choose=lambda logits: _choose(logits, mask_token_id, temperature, top_p, generator),
    )
    started = time.perf_counter()
    with torch.inference_mode():
        tokens, unmasked = decoder.run(prompt_ids, max_new_tokens)
    return GenerationResult(tokens, decoder.forwards, time.perf_counter() - started, unmasked)


class _BlockDecoder:
    """The decoding loop of `generate`; state tensors hold the active rows only.

    Row state: `seq` `[n, S]` tokens at absolute positions (mask id where not decoded yet),
    `masked` `[n, S]`, `start` `[n]` (current block's first position), `plen`/`limit` `[n]`
    (prompt length; first position not to generate), `fresh` `[n]` (block keys not written yet).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        mask_token_id: int,
        stop_token_id: int,
        block_size: int,
        sub_block_size: int,
        threshold: float,
        use_sub_block_cache: bool,
        choose: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> None:
        self.model = model
        self.mask_id, self.stop_id = mask_token_id, stop_token_id
        self.block, self.sub = block_size, sub_block_size
        self.threshold = threshold
        self.use_sub_block_cache = use_sub_block_cache
        self.choose = choose
        self.forwards = 0
        self.mask: tuple[tuple[bool, int, int], object] | None = None  # (key, attention mask)
        device = model.device
        self.ar_block = torch.arange(block_size, device=device)
        self.ar_sub = torch.arange(sub_block_size, device=device)

    def _forward(
        self, q_pos: Tensor, write: Tensor | None, kv_len: int, keep: Tensor, prefill: bool = False
    ) -> Tensor:
        """Logits `[n, k, V]` at query indices `keep` `[n, k]` of the tokens at `q_pos` `[n, q]`.

        `write` and `kv_len` as in `_PositionCache.plan`. Queries lie in each row's current
        block, or for the `prefill` at positions `[0, kv_len)`.
        """
        self.cache.plan(q_pos, write, kv_len)
        self.forwards += 1
        # Rows' blocks only move on commits and retirements (which reset `mask`): reuse it.
        key = (prefill, q_pos.shape[1], kv_len)
        if self.mask is None or self.mask[0] != key:
            block_pos = None if prefill else self.start[:, None]
            self.mask = key, _attention_mask(self.model, block_pos, key[1], kv_len, self.block)
        return self.model(
            input_ids=self.seq.gather(1, q_pos),
            position_ids=q_pos,
            attention_mask=self.mask[1],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits

    def run(
        self, prompt_ids: list[list[int]], max_new_tokens: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        device, b = self.model.device, self.block
        plen = torch.tensor([len(p) for p in prompt_ids], device=device)
        self.limit = plen + max_new_tokens
        length = int(-(-self.limit.max() // b) * b)
        self.seq = torch.full((len(prompt_ids), length), self.mask_id, device=device)
        for i, p in enumerate(prompt_ids):
            self.seq[i, : len(p)] = torch.tensor(p, device=device)
        positions = torch.arange(length, device=device)
        self.masked = positions >= plen[:, None]  # [n, S]
        self.plen, self.start = plen, plen // b * b
        self.fresh = torch.ones_like(plen, dtype=torch.bool)
        self.ids = torch.arange(len(prompt_ids), device=device)
        self.cache = _PositionCache(self.model.config.num_hidden_layers, length)
        self.tokens: list[list[int]] = [[] for _ in prompt_ids]
        self.unmasked: list[list[int]] = [[] for _ in prompt_ids]
        self._prefill()
        while self._retire_finished():
            self._step()
        return self.tokens, self.unmasked

    def _prefill(self) -> None:
        """Whole prompt blocks, once; a prompt ending on a block boundary gets its first token."""
        prefix = int(self.start.max())
        if prefix == 0:
            return
        n = self.seq.shape[0]
        # Rows with shorter prefixes compute junk beyond them; it lands in slots that their
        # first block forward overwrites before anything attends them.
        q_pos = torch.arange(prefix, device=self.seq.device).expand(n, prefix)
        last = (self.start - 1).clamp(min=0)[:, None]  # [n, 1]
        token, _ = self.choose(self._forward(q_pos, None, prefix, last, prefill=True))  # [n, 1]
        self._append_ar_token(self.plen % self.block == 0, token[:, 0])

    def _append_ar_token(self, rows: Tensor, token: Tensor) -> None:
        """Put `token` `[n]` at the current block's first position for `rows` `[n]`."""
        at = self.start[:, None]
        self.seq.scatter_(1, at, torch.where(rows, token, self.seq.gather(1, at)[:, 0])[:, None])
        self.masked.scatter_(1, at, self.masked.gather(1, at) & ~rows[:, None])

    def _retire_finished(self) -> bool:
        """Hand out rows that hit a stop token (no masks before it) or their token budget."""
        b = self.block
        pos = self.start[:, None] + self.ar_block  # [n, B]
        block, masked = self.seq.gather(1, pos), self.masked.gather(1, pos)
        generated = (pos >= self.plen[:, None]) & (pos < self.limit[:, None])
        stops = (block == self.stop_id) & ~masked & generated
        first_stop = torch.where(stops.any(1), stops.int().argmax(1), b)
        before_stop = masked & generated & (self.ar_block < first_stop[:, None])
        stopped = stops.any(1) & ~before_stop.any(1)
        exhausted = ~(masked & generated).any(1) & (self.start + b >= self.limit)
        done = stopped | exhausted
        if not done.any():
            return True
        end = torch.where(stopped, self.start + first_stop + 1, self.limit)
        for row in done.nonzero()[:, 0].tolist():
            i = int(self.ids[row])
            self.tokens[i] = self.seq[row, int(self.plen[row]) : int(end[row])].tolist()
        keep = (~done).nonzero()[:, 0]
        for name in ("seq", "masked", "start", "plen", "limit", "fresh", "ids"):
            setattr(self, name, getattr(self, name)[keep])
        self.cache.select_rows(keep)
        self.mask = None
        return len(keep) > 0

    def _step(self) -> None:
        """One forward for every active row: a denoising step, or the commit of its block."""
        n, b, s = self.seq.shape[0], self.block, self.sub
        pos = self.start[:, None] + self.ar_block  # [n, B]
        block_masked = self.masked.gather(1, pos)
        todo = block_masked & (pos < self.limit[:, None])  # [n, B]
        has_todo = todo.view(n, b // s, s).any(-1)  # [n, sub-blocks]
        committing = ~has_todo.any(1)  # [n]
        sub_start = has_todo.int().argmax(1) * s  # [n], block-relative
        in_sub = todo.gather(1, sub_start[:, None] + self.ar_sub)  # [n, s]
        # The positions to decide, masked ones first (ascending), cut to the widest row.
        order = torch.sort((~in_sub).char(), dim=1, stable=True).indices
        k = max(int(in_sub.sum(1).max()), 1)
        targets = sub_start[:, None] + order[:, :k]  # [n, k], block-relative
        valid = in_sub.gather(1, order[:, :k])

        full_rows = committing | self.fresh | block_masked.gather(1, sub_start[:, None])[:, 0]
        kv_len = int(self.start.max()) + b
        q_first = torch.zeros_like(sub_start)  # block-relative position of query index 0
        if not self.use_sub_block_cache or full_rows.all():
            q_pos, write = pos, None
        elif full_rows.any():
            sub_end = sub_start[:, None] + s
            in_sub_slots = (self.ar_block >= sub_start[:, None]) & (self.ar_block < sub_end)
            q_pos, write = pos, full_rows[:, None] | in_sub_slots
        else:
            q_pos, write, q_first = pos.gather(1, sub_start[:, None] + self.ar_sub), None, sub_start
        # The logit of position j-1 scores position j (targets are never a query's first
        # position); a commit reads the block's last logit.
        source = (targets - 1 - q_first[:, None]).clamp(min=0)  # [n, k] query indices
        source[:, 0] = torch.where(committing, b - 1, source[:, 0])
        logits = self._forward(q_pos, write, kv_len, source)
        token, confidence = self.choose(logits)  # [n, k]

        confidence = confidence.masked_fill(~valid, -torch.inf)
        pick = valid & (confidence > self.threshold)
        best = confidence.argmax(1, keepdim=True)
        pick.scatter_(1, best, pick.gather(1, best) | valid.gather(1, best))
        at = self.start[:, None] + targets
        self.seq.scatter_(1, at, torch.where(pick, token, self.seq.gather(1, at)))
        self.masked.scatter_(1, at, self.masked.gather(1, at) & ~pick)
        for i, count, commit in zip(
            self.ids.tolist(), pick.sum(1).tolist(), committing.tolist(), strict=True
        ):
            if not commit:
                self.unmasked[i].append(count)

        self.fresh = committing
        if committing.any():
            self.start = torch.where(committing, self.start + b, self.start)
            self.mask = None
            self._append_ar_token(committing, token[:, 0])


def generate_ar(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    stop_token_id: int,
    max_new_tokens: int,
) -> GenerationResult:
    """Greedy AR decoding with HF `generate` (KV cache): the baseline for `generate`.

    Prompts are left-padded into one batch; `forwards` = decoding steps taken.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= stop_token_id < _vocab_size(model):
        raise ValueError(f"stop_token_id {stop_token_id} is outside the model's vocabulary")
    _validate_prompts(model, prompt_ids)
    device, width = model.device, max(len(p) for p in prompt_ids)
    pad = model.config.pad_token_id
    pad = stop_token_id if pad is None else pad
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    attention = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device
    )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_id,
        pad_token_id=pad,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=attention, generation_config=config)
    seconds = time.perf_counter() - started
    tokens = []
    for row in out[:, width:].tolist():
        cut = row.index(stop_token_id) + 1 if stop_token_id in row else len(row)
        tokens.append(row[:cut])
    steps = out.shape[1] - width
    return GenerationResult(tokens, steps, seconds, [[1] * len(t) for t in tokens])
