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
from src.decoding.cache import PositionCache, Rule, attention_inputs, block_causal
from src.decoding.settings import DecodeSettings
from src.diffusion.settings import check_context


def choose_tokens(
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


def check_ids(
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
    context: str = "block_causal",
) -> GenerationResult:
    """Cached parallel block-diffusion decoding of a batch of prompts (any lengths).

    `threshold`: unmask every masked position of the sub-block whose confidence exceeds it,
    and at least the most confident one (>= 1: one token per step; 0: a sub-block per step).
    `use_sub_block_cache`: reuse the block's stale keys/values while a sub-block is decoded
    (an approximation; exact when `sub_block_size == block_size`). `temperature > 0` samples
    every token (AR steps too) with top-p truncation, drawing from `generator`. Ids from
    `vocab_limit` on (the tokenizer's length: untrained padding rows) are never emitted.
    `context`: the export's `diffusion.context` (`causal`: the prefill and commits attend
    causally, as the clean stream did in training; SPEC 6's one-cache variant). Raises ValueError on bad arguments before any forward (the settings' rules are
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
    check_ids(model, prompt_ids, mask_token_id, stop_token_id, max_new_tokens)
    check_context(context)
    decoder = _BlockDecoder(
        model,
        settings,
        mask_token_id=mask_token_id,
        stop_token_id=stop_token_id,
        choose=lambda logits: choose_tokens(
            logits, mask_token_id, temperature, top_p, generator, vocab_limit
        ),
        context=context,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        tokens, unmasked = decoder.run(prompt_ids, max_new_tokens)
    return GenerationResult(tokens, decoder.forwards, time.perf_counter() - started, unmasked)


class _BlockDecoder:
    """The decoding loop of `generate`; state tensors hold the active rows only.

    Row state: `seq` `[n, S]` tokens at absolute positions (mask id where not decoded yet),
    `masked` `[n, S]`, `start` `[n]` (current block's first position), `plen`/`limit` `[n]`
    (prompt length; first position not to generate), `fresh` `[n]` (block keys not written
    yet), `picked` `[n]` (positions the last step unmasked; -1: it committed).

    One device-to-host transfer per step (`_status`): what the next step's shapes, the
    batch's membership and the statistics depend on comes back in one `.tolist()`; the rest
    stays on the device.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        settings: DecodeSettings,
        *,
        mask_token_id: int,
        stop_token_id: int,
        choose: Callable[[Tensor], tuple[Tensor, Tensor]],
        context: str = "block_causal",
    ) -> None:
        self.model = model
        self.mask_id, self.stop_id = mask_token_id, stop_token_id
        self.block, self.sub = settings.block_size, settings.sub_block_size
        self.threshold = settings.threshold
        self.use_sub_block_cache = settings.use_sub_block_cache
        self.choose = choose
        # SPEC 6's one-cache variant: the committed context is causal (prefill and commits
        # attend causally), as the clean stream was in training.
        self.causal_context = context == "causal"
        self.forwards = 0
        self.mask_key: tuple | None = None
        self.mask: dict = {}
        device = model.device
        self.ar_block = torch.arange(self.block, device=device)
        self.ar_sub = torch.arange(self.sub, device=device)

    def _forward(
        self,
        q_pos: Tensor,
        write: Tensor | None,
        kv_len: int,
        keep: Tensor,
        mask_key: tuple,
        rule: Callable[[], Rule | None],
    ) -> Tensor:
        """Logits `[n, k, V]` at query indices `keep` `[n, k]` of the tokens at `q_pos` `[n, q]`.

        `write` and `kv_len` as in `PositionCache.plan`. The attention rule (`rule()`, None:
        every slot) is built again only when `mask_key` changes (rows' blocks move on commits
        and retirements only).
        """
        self.cache.plan(q_pos, write, kv_len)
        self.forwards += 1
        if self.mask_key != mask_key:
            self.mask_key = mask_key
            self.mask = attention_inputs(self.model, rule(), q_pos.shape[0], q_pos.shape[1], kv_len)
        return self.model(
            input_ids=self.seq.gather(1, q_pos),
            position_ids=q_pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
            **self.mask,
        ).logits

    def run(
        self, prompt_ids: list[list[int]], max_new_tokens: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        device, b, n = self.model.device, self.block, len(prompt_ids)
        self.host_plen = [len(p) for p in prompt_ids]
        length = -(-(max(self.host_plen) + max_new_tokens) // b) * b
        rows = [p + [self.mask_id] * (length - len(p)) for p in prompt_ids]
        self.seq = torch.tensor(rows, device=device)  # [n, S]
        plen = torch.tensor(self.host_plen, device=device)
        self.limit = plen + max_new_tokens
        self.masked = torch.arange(length, device=device) >= plen[:, None]  # [n, S]
        self.plen, self.start = plen, plen // b * b
        self.fresh = torch.ones_like(plen, dtype=torch.bool)
        self.picked = torch.full_like(plen, -1)
        self.ids = list(range(n))
        self.cache = PositionCache(self.model.config.num_hidden_layers, length)
        self.finished: list[tuple[int, Tensor]] = []
        self.unmasked: list[list[int]] = [[] for _ in prompt_ids]
        self._prefill()
        status = self._status()
        while status:
            self._step(status)
            status = self._status()
        tokens: list[list[int]] = [[] for _ in prompt_ids]
        if self.finished:
            flat = torch.cat([row for _, row in self.finished]).tolist()
            for i, row in self.finished:
                tokens[i], flat = flat[: len(row)], flat[len(row) :]
        return tokens, self.unmasked

    def _prefill(self) -> None:
        """Whole prompt blocks, once; a prompt ending on a block boundary gets its first token."""
        b = self.block
        prefix = max(p // b * b for p in self.host_plen)
        if prefix == 0:
            return
        n = self.seq.shape[0]
        # Rows with shorter prefixes compute junk beyond them; it lands in slots that their
        # first block forward overwrites before anything attends them.
        q_pos = torch.arange(prefix, device=self.seq.device).expand(n, prefix)
        last = (self.start - 1).clamp(min=0)[:, None]  # [n, 1]
        width = 1 if self.causal_context else b

        def rule() -> Rule | None:
            return None if prefix == width else block_causal(torch.zeros_like(self.plen), width)

        logits = self._forward(q_pos, None, prefix, last, ("prefill", prefix), rule)
        token, _ = self.choose(logits)  # [n, 1]
        self._append_ar_token(self.plen % b == 0, token[:, 0])

    def _append_ar_token(self, rows: Tensor, token: Tensor) -> None:
        """Put `token` `[n]` at the current block's first position for `rows` `[n]`."""
        at = self.start[:, None]
        self.seq.scatter_(1, at, torch.where(rows, token, self.seq.gather(1, at)[:, 0])[:, None])
        self.masked.scatter_(1, at, self.masked.gather(1, at) & ~rows[:, None])

    def _status(self) -> list[list[int]]:
        """Record the last step's statistics, hand out rows that hit a stop token (no masks
        before it) or their token budget, and return the next step's plan of the others:
        per row [committing, masked positions of its sub-block, full-block forward, start].
        Empty: every row is done."""
        n, b, s = self.seq.shape[0], self.block, self.sub
        pos = self.start[:, None] + self.ar_block  # [n, B]
        block, masked = self.seq.gather(1, pos), self.masked.gather(1, pos)
        generated = (pos >= self.plen[:, None]) & (pos < self.limit[:, None])
        todo = masked & generated  # [n, B]
        stops = (block == self.stop_id) & ~masked & generated
        first_stop = torch.where(stops.any(1), stops.int().argmax(1), b)
        stopped = stops.any(1) & ~(todo & (self.ar_block < first_stop[:, None])).any(1)
        exhausted = ~todo.any(1) & (self.start + b >= self.limit)
        done = stopped | exhausted
        end = torch.where(stopped, self.start + first_stop + 1, self.limit)
        has_todo = todo.view(n, b // s, s).any(-1)  # [n, sub-blocks]
        committing = ~has_todo.any(1)  # [n]
        sub_start = has_todo.int().argmax(1) * s  # [n], block-relative
        in_sub = todo.gather(1, sub_start[:, None] + self.ar_sub)  # [n, s]
        full = committing | self.fresh | masked.gather(1, sub_start[:, None])[:, 0]
        self.plan = pos, masked, committing, sub_start, in_sub, full
        columns = (done, end, self.picked, committing, in_sub.sum(1), full, self.start)
        status = torch.stack([c.long() for c in columns], 1).tolist()  # the step's one sync

        for i, (_, _, picked, *_) in zip(self.ids, status, strict=True):
            if picked >= 0:
                self.unmasked[i].append(picked)
        keep = [r for r, row in enumerate(status) if not row[0]]
        if len(keep) < n:
            for r, row in enumerate(status):
                if row[0]:
                    self.finished.append((self.ids[r], self.seq[r, self.host_plen[r] : row[1]]))
            index = torch.tensor(keep, dtype=torch.long, device=self.seq.device)
            for name in ("seq", "masked", "start", "plen", "limit", "fresh", "picked"):
                setattr(self, name, getattr(self, name)[index])
            self.plan = tuple(t[index] for t in self.plan)
            self.ids = [self.ids[r] for r in keep]
            self.host_plen = [self.host_plen[r] for r in keep]
            self.cache.select_rows(index)
            self.mask_key = None
        return [status[r][3:] for r in keep]

    def _step(self, status: list[list[int]]) -> None:
        """One forward for every active row: a denoising step, or the commit of its block."""
        b, s = self.block, self.sub
        pos, block_masked, committing, sub_start, in_sub, full_rows = self.plan
        commits, starts = tuple(r[0] for r in status), tuple(r[3] for r in status)
        # The positions to decide, masked ones first (ascending), cut to the widest row.
        order = torch.sort((~in_sub).char(), dim=1, stable=True).indices
        k = max(max(r[1] for r in status), 1)
        targets = sub_start[:, None] + order[:, :k]  # [n, k], block-relative
        valid = in_sub.gather(1, order[:, :k])

        kv_len = max(starts) + b
        q_first = torch.zeros_like(sub_start)  # block-relative position of query index 0
        if not self.use_sub_block_cache or all(r[2] for r in status):
            q_pos, write = pos, None
        elif any(r[2] for r in status):
            sub_end = sub_start[:, None] + s
            in_sub_slots = (self.ar_block >= sub_start[:, None]) & (self.ar_block < sub_end)
            q_pos, write = pos, full_rows[:, None] | in_sub_slots
        else:
            q_pos, write, q_first = pos.gather(1, sub_start[:, None] + self.ar_sub), None, sub_start
        # The logit of position j-1 scores position j (targets are never a query's first
        # position); a commit reads the block's last logit.
        source = (targets - 1 - q_first[:, None]).clamp(min=0)  # [n, k] query indices
        source[:, 0] = torch.where(committing, b - 1, source[:, 0])
        causal = commits if self.causal_context else (False,) * len(commits)
        start = self.start

        def rule() -> Rule | None:
            # Every query lies in its row's block; with the rows' blocks aligned and no causal
            # commit, each sees every slot below kv_len.
            if len(set(starts)) == 1 and not any(causal):
                return None
            block_rule = block_causal(start, b)
            if not any(causal):
                return block_rule
            causal_rows = torch.tensor(causal, dtype=torch.bool, device=start.device)
            return lambda r, q, kv: block_rule(r, q, kv) & (~causal_rows[r] | (kv <= start[r] + q))

        key = ("step", q_pos.shape[1], kv_len, starts, causal)
        logits = self._forward(q_pos, write, kv_len, source, key, rule)
        token, confidence = self.choose(logits)  # [n, k]

        confidence = confidence.masked_fill(~valid, -torch.inf)
        pick = valid & (confidence > self.threshold)
        best = confidence.argmax(1, keepdim=True)
        pick.scatter_(1, best, pick.gather(1, best) | valid.gather(1, best))
        at = self.start[:, None] + targets
        self.seq.scatter_(1, at, torch.where(pick, token, self.seq.gather(1, at)))
        self.masked.scatter_(1, at, self.masked.gather(1, at) & ~pick)
        self.picked = torch.where(committing, -1, pick.sum(1))
        self.fresh = committing
        self.start = torch.where(committing, self.start + b, self.start)
        self._append_ar_token(committing, token[:, 0])
