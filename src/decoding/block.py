"""Cached parallel decoding of a block-diffusion LM (SPEC section 3).

`generate` decodes blocks of `block_size` tokens left to right. Inside a block, masked
positions are filled sub-block by sub-block: each step forwards the current block against the
block-level KV cache, scores every masked position of the sub-block with the logit of the
position before it (the AR token shift), and unmasks all positions whose confidence exceeds
`threshold` (at least the most confident one). A finished block is forwarded once more to store
its exact keys/values; the argmax of its last logit starts the next block.

Design, so that batched decoding is exact (each sequence gets the tokens it gets alone):

- The KV cache (`src.decoding.cache`) is a buffer indexed by *absolute position*. Blocks are
  aligned to absolute positions per sequence, so no padding is needed: a row attends slots
  ``< end of its current block`` (the block-causal rule of `block_causal_allowed`), and every
  slot below that is a real token. Every forward writes its query tokens' keys/values first,
  so the commit pass overwrites a block's draft keys with the exact ones.
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

import torch
from torch import Tensor
from transformers import PreTrainedModel

from src.decoding.base import GenerationResult, validate_prompts, vocab_size
from src.decoding.cache import PositionCache, attention_mask
from src.decoding.settings import DecodeSettings


def _choose(
    logits: Tensor,
    mask_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    vocab_limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Token and its confidence per position: `[..., V]` -> `[...]`, `[...]`.

    Greedy: argmax and its softmax probability. Sampling: a draw from the temperature-scaled,
    top-p-truncated distribution and its (renormalised) probability. The mask token, and ids
    from `vocab_limit` on (embedding rows no token has, e.g. Qwen2.5's padding rows), are
    excluded before the softmax, so they are never emitted.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits[..., mask_token_id] = -torch.inf
    if vocab_limit is not None:
        logits[..., vocab_limit:] = -torch.inf
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


def _check_ids(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    mask_token_id: int,
    stop_token_id: int,
    max_new_tokens: int,
) -> None:
    vocab = vocab_size(model)
    if not 0 <= mask_token_id < vocab:
        raise ValueError(
            f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab}): "
            "add the mask token to the tokenizer and resize the embeddings"
        )
    if not 0 <= stop_token_id < vocab or stop_token_id == mask_token_id:
        raise ValueError(
            f"stop_token_id {stop_token_id} must be a vocabulary id other than the mask"
        )
    validate_prompts(model, prompt_ids, max_new_tokens)


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
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Cached parallel block-diffusion decoding of a batch of prompts (any lengths).

    `threshold`: unmask every masked position of the sub-block whose confidence exceeds it,
    and at least the most confident one (>= 1: one token per step; 0: a sub-block per step).
    `use_sub_block_cache`: reuse the block's stale keys/values while a sub-block is decoded
    (an approximation; exact when `sub_block_size == block_size`). `temperature > 0` samples
    every token (AR steps too) with top-p truncation, drawing from `generator`. Ids from
    `vocab_limit` on (the tokenizer's length: untrained padding rows) are never emitted.
    Raises ValueError on bad arguments before any forward (the settings' rules are
    `DecodeSettings`'s).
    """
    settings = DecodeSettings(
        block_size=block_size,
        sub_block_size=sub_block_size,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        use_sub_block_cache=use_sub_block_cache,
        temperature=temperature,
        top_p=top_p,
    )
    _check_ids(model, prompt_ids, mask_token_id, stop_token_id, max_new_tokens)
    decoder = _BlockDecoder(
        model,
        settings,
        mask_token_id=mask_token_id,
        stop_token_id=stop_token_id,
        choose=lambda logits: _choose(
            logits, mask_token_id, temperature, top_p, generator, vocab_limit
        ),
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
        settings: DecodeSettings,
        *,
        mask_token_id: int,
        stop_token_id: int,
        choose: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> None:
        self.model = model
        self.mask_id, self.stop_id = mask_token_id, stop_token_id
        self.block, self.sub = settings.block_size, settings.sub_block_size
        self.threshold = settings.threshold
        self.use_sub_block_cache = settings.use_sub_block_cache
        self.choose = choose
        self.forwards = 0
        self.mask: tuple[tuple[bool, int, int], object] | None = None  # (key, attention mask)
        device = model.device
        self.ar_block = torch.arange(self.block, device=device)
        self.ar_sub = torch.arange(self.sub, device=device)

    def _forward(
        self, q_pos: Tensor, write: Tensor | None, kv_len: int, keep: Tensor, prefill: bool = False
    ) -> Tensor:
        """Logits `[n, k, V]` at query indices `keep` `[n, k]` of the tokens at `q_pos` `[n, q]`.

        `write` and `kv_len` as in `PositionCache.plan`. Queries lie in each row's current
        block, or for the `prefill` at positions `[0, kv_len)`.
        """
        self.cache.plan(q_pos, write, kv_len)
        self.forwards += 1
        # Rows' blocks only move on commits and retirements (which reset `mask`): reuse it.
        key = (prefill, q_pos.shape[1], kv_len)
        if self.mask is None or self.mask[0] != key:
            block_pos = None if prefill else self.start[:, None]
            self.mask = key, attention_mask(self.model, block_pos, key[1], kv_len, self.block)
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
        self.cache = PositionCache(self.model.config.num_hidden_layers, length)
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
