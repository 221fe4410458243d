"""Self-verified decoding (SPEC section 6): the block-diffusion mode drafts, the causal mode
verifies, so the tokens are exactly the causal mode's greedy ones (`decoder=ar`'s).

Per row, the positions below `a` are final; from `a` on a position holds a draft (a
proposal) or the mask. An iteration of a row:

- draft: a block-diffusion forward (SPEC 3's attention and token shift) of the block to
  draft, its final and drafted tokens as they are and the mask elsewhere, proposes tokens
  for its masked positions: all of them (`draft="single"`), or SPEC 3's threshold rule in
  the first sub-block that has any (`"threshold"`: each one above the threshold, at least the
  most confident one; repeated until the block has no masked position left);
- verify: a causal forward of position a-1 (final) and of the contiguous drafts a..d-1 over
  the causal KV cache of the positions before. The drafts equal to the causal argmax at their
  position are accepted up to the first that is not, and the causal argmax there (or at d)
  is accepted too, so every verification makes >= 1 token final; the later drafts are
  masked again. The first verification covers the prompt (the causal prefill).

How the two share the work depends on the context the export was trained with
(`diffusion.context` in diffusion.json):

- `block_causal` (the paper's; two caches): drafts attend the block-level cache of SPEC 3
  (each finished block's exact block-causal keys/values), verifications the causal cache,
  in separate forwards. The block to draft is the one holding `a`; once it has no masked
  position left (one forward with `single`), it is verified. A draft forward of a block
  whose predecessor is not in the block-level cache yet runs that block too, writing its
  exact keys/values (SPEC 3's commit, merged with the next block's first draft; at the start
  it is the prefill of the prompt's whole blocks). Rows wait for each other: a verify forward
  runs when every row's block is drafted; rows drafted early ride along in draft forwards.
- `causal` (one cache): the clean context is causal, so one causal cache serves both, and
  every forward verifies the drafts a..d-1 and drafts the block holding d, taking those
  drafts as accepted: its draft part attends the causal cache below its block (the slots the
  verify part of the same forward writes included) and itself. Its proposals are kept when
  every draft was accepted (they were conditioned on them) and dropped otherwise. Its keys
  and values go to the slots one block past it, which hold no final position's keys yet.

Rows progress independently (per-row positions, slots and logit indices; rows leave the
batch when done), and one device-to-host transfer per forward (`_status`) plans the next.

Example::

    result = generate_verified(model, [ids], mask_token_id=mask_id, stop_token_id=stop_id,
                               block_size=32, sub_block_size=8, threshold=0.9,
                               max_new_tokens=256, draft="single")
    result.tokens[0], result.forwards_by_kind, result.acceptance_length
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import PreTrainedModel

from src.decoding.ar import greedy_token
from src.decoding.base import GenerationResult
from src.decoding.block import check_ids, choose_tokens
from src.decoding.cache import PositionCache, Rule, attention_inputs, block_causal
from src.decoding.settings import DecodeSettings
from src.diffusion.settings import check_context


def generate_verified(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    mask_token_id: int,
    stop_token_id: int,
    block_size: int,
    sub_block_size: int,
    threshold: float,
    max_new_tokens: int,
    draft: str = "single",
    context: str = "block_causal",
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Self-verified decoding of a batch of prompts (any lengths): `decoder=ar`'s greedy
    tokens, drafted in parallel. `draft`, `sub_block_size` and `threshold` say how drafts are
    made (`single` or SPEC 3's `threshold` loop), `context` is the export's
    `diffusion.context`. Ids from `vocab_limit` on are never emitted. Raises ValueError on bad
    arguments before any forward."""
    settings = DecodeSettings(
        block_size=block_size,
        sub_block_size=sub_block_size,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        use_sub_block_cache=False,
        temperature=0.0,
        top_p=1.0,
        draft=draft,
    )
    check_ids(model, prompt_ids, mask_token_id, stop_token_id, max_new_tokens)
    check_context(context)
    decoder = _VerifiedDecoder(
        model,
        settings,
        mask_token_id=mask_token_id,
        stop_token_id=stop_token_id,
        context=context,
        vocab_limit=vocab_limit,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        tokens = decoder.run(prompt_ids, max_new_tokens)
    return GenerationResult(
        tokens,
        decoder.forwards,
        time.perf_counter() - started,
        decoder.proposals,
        forwards_by_kind=decoder.kinds,
        accepted_per_iteration=decoder.accepts,
    )


class _Row(NamedTuple):
    """A row's plan for the next forward, on the host (`_status`)."""

    a: int  # first position that is not final
    c: int  # the causal cache holds the exact keys/values of positions < c
    d: int  # drafts a..d-1 are contiguous; d is not drafted
    s: int  # first position of the block to draft
    first: int  # first position the draft forward runs (< s: it commits the block before)
    complete: bool  # the block to draft has no masked position left
    candidates: int  # positions the next draft decides


class _VerifiedDecoder:
    """The loop of `generate_verified`; state tensors hold the active rows only.

    Row state: `seq` `[n, W]` tokens at absolute positions (final, drafted, or the mask id),
    `drafted` `[n, W]`, `a`/`c` `[n]` (see `_Row`), `committed` `[n]` (the block-level cache
    holds the blocks below it; two caches only), `plen`/`limit` `[n]` (prompt length; first
    position not to generate), `proposed`/`accepted` `[n]` (what the last forward drafted and
    made final; -1: nothing of that kind). Slot W-1 of a cache takes the writes of padded
    queries (never attended: every forward's keys end below it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        settings: DecodeSettings,
        *,
        mask_token_id: int,
        stop_token_id: int,
        context: str,
        vocab_limit: int | None,
    ) -> None:
        self.model = model
        self.mask_id, self.stop_id = mask_token_id, stop_token_id
        self.block, self.sub, self.threshold = (
            settings.block_size,
            settings.sub_block_size,
            settings.threshold,
        )
        self.single = settings.draft == "single"
        self.one_cache = context == "causal"
        self.vocab_limit = vocab_limit
        self.forwards = 0
        self.kinds: dict[str, int] = {}
        self.ar_block = torch.arange(self.block, device=model.device)

    def run(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        device, b, n = self.model.device, self.block, len(prompt_ids)
        self.host_plen = [len(p) for p in prompt_ids]
        longest = max(self.host_plen) + max_new_tokens
        # Room for the draft block's scratch slots past the last block, and slot W-1.
        self.width = -(-(longest + 1) // b) * b + 2 * b
        rows = [p + [self.mask_id] * (self.width - len(p)) for p in prompt_ids]
        self.seq = torch.tensor(rows, device=device)  # [n, W]
        self.positions = torch.arange(self.width, device=device)
        self.drafted = torch.zeros_like(self.seq, dtype=torch.bool)
        self.plen = torch.tensor(self.host_plen, device=device)
        self.limit = self.plen + max_new_tokens
        self.a = self.plen.clone()
        self.c = torch.zeros_like(self.plen)
        self.committed = torch.zeros_like(self.plen)
        self.proposed = torch.full_like(self.plen, -1)
        self.accepted = torch.full_like(self.plen, -1)
        self.ids = list(range(n))
        layers = self.model.config.num_hidden_layers
        self.causal_cache = PositionCache(layers, self.width)
        self.draft_cache = (
            self.causal_cache if self.one_cache else PositionCache(layers, self.width)
        )
        self.finished: list[tuple[int, Tensor]] = []
        self.proposals: list[list[int]] = [[] for _ in prompt_ids]
        self.accepts: list[list[int]] = [[] for _ in prompt_ids]
        plan = self._status()
        while plan:
            if self.one_cache:
                self._verify_and_draft(plan)
            elif all(row.complete for row in plan):
                self._verify(plan)
            else:
                self._draft(plan)
            plan = self._status()
        tokens: list[list[int]] = [[] for _ in prompt_ids]
        if self.finished:
            flat = torch.cat([row for _, row in self.finished]).tolist()
            for i, row in self.finished:
                tokens[i], flat = flat[: len(row)], flat[len(row) :]
        return tokens

    def _status(self) -> list[_Row]:
        """Record the last forward's statistics, hand out the rows that are done (a final stop
        token, or the budget reached) and return the others' plans: the forward's one
        device-to-host transfer."""
        n, b = self.seq.shape[0], self.block
        pos = self.positions
        stops = (self.seq == self.stop_id) & (pos < self.a[:, None]) & (pos >= self.plen[:, None])
        stopped = stops.any(1)
        end = torch.where(stopped, stops.int().argmax(1) + 1, self.limit)
        done = stopped | (self.a >= self.limit)
        # The contiguous drafts a..d-1, and the block to draft.
        d = (~self.drafted & (pos >= self.a[:, None])).int().argmax(1)
        s = (d if self.one_cache else self.a) // b * b
        first = s if self.one_cache else torch.minimum(self.committed, s)
        at = s[:, None] + self.ar_block  # [n, B]
        open_ = ~self.drafted.gather(1, at) & (at >= self.a[:, None]) & (at < self.limit[:, None])
        if self.one_cache:
            open_ &= at != d[:, None]  # the verification of the same forward fills d
        candidates = open_
        if not self.single:  # SPEC 3: the first sub-block with masked positions
            has = open_.view(n, b // self.sub, self.sub).any(-1)
            first_sub = has.int().argmax(1)
            candidates = open_ & (self.ar_block // self.sub == first_sub[:, None])
        self.plan = d, s, first, candidates
        columns = (done, end, self.proposed, self.accepted, self.a, self.c, d, s, first)
        status = torch.stack(
            [*(t.long() for t in columns), (~open_.any(1)).long(), candidates.sum(1)], 1
        ).tolist()  # the forward's one sync

        for i, row in zip(self.ids, status, strict=True):
            if row[2] >= 0:
                self.proposals[i].append(row[2])
            if row[3] >= 0:
                self.accepts[i].append(row[3])
        keep = [r for r, row in enumerate(status) if not row[0]]
        if len(keep) < n:
            for r, row in enumerate(status):
                if row[0]:
                    self.finished.append((self.ids[r], self.seq[r, self.host_plen[r] : row[1]]))
            index = torch.tensor(keep, dtype=torch.long, device=self.seq.device)
            for name in ("seq", "drafted", "plen", "limit", "a", "c", "committed"):
                setattr(self, name, getattr(self, name)[index])
            self.plan = tuple(t[index] for t in self.plan)
            self.ids = [self.ids[r] for r in keep]
            self.host_plen = [self.host_plen[r] for r in keep]
            self.causal_cache.select_rows(index)
            if not self.one_cache:
                self.draft_cache.select_rows(index)
        return [_Row(*status[r][4:9], bool(status[r][9]), status[r][10]) for r in keep]

    def _forward(
        self,
        cache: PositionCache,
        q_pos: Tensor,
        slots: Tensor,
        write: Tensor,
        kv_len: int,
        keep: Tensor,
        rule: Rule | None,
        kind: str,
    ) -> Tensor:
        """Logits `[n, k, V]` at query indices `keep` `[n, k]` of the tokens at positions
        `q_pos` `[n, q]`, whose keys/values go to `slots` where `write` (else to slot W-1)."""
        last = self.width - 1
        slots = torch.where(write, slots, last)
        cache.plan(slots, write, kv_len)
        self.forwards += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        mask = attention_inputs(self.model, rule, q_pos.shape[0], q_pos.shape[1], kv_len)
        return self.model(
            input_ids=self.seq.gather(1, q_pos.clamp(max=last)),
            position_ids=q_pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
            **mask,
        ).logits

    def _draft(self, plan: list[_Row]) -> None:
        """Two caches: a block-diffusion forward of each row's block (and of the block before
        it, where that is not in the block-level cache yet) over the block-level cache."""
        b = self.block
        _, s, first, candidates = self.plan
        q_len = max(row.s + b - row.first for row in plan)
        q_pos = first[:, None] + torch.arange(q_len, device=s.device)  # [n, q]
        write = q_pos < (s + b)[:, None]
        k = max(row.candidates for row in plan)
        targets, valid = self._targets(candidates, k)
        source = (s[:, None] + targets - 1 - first[:, None]).clamp(min=0)  # shifted logits
        commits = any(row.first < row.s for row in plan)
        # Every query in its row's block, blocks aligned: each sees every slot below kv_len.
        aligned = not commits and len({row.s for row in plan}) == 1
        rule = None if aligned else block_causal(first, b)
        kv_len = max(row.s for row in plan) + b
        kind = "commit" if commits else "draft"
        logits = self._forward(self.draft_cache, q_pos, q_pos, write, kv_len, source, rule, kind)
        # A block's first position is proposed from the previous block's last logit (SPEC 3's
        # AR step), in the forward that commits that block.
        self._propose(logits, s, targets, valid, forced=valid & (targets == 0))
        self.committed = s
        self.accepted = torch.full_like(self.a, -1)

    def _verify(self, plan: list[_Row]) -> None:
        """Two caches: a causal forward of a-1..d-1 (from c on) over the causal cache."""
        q_pos, keep = self._verify_queries(plan)
        kv_len = max(row.d for row in plan)
        rule = block_causal(self.c, 1)
        logits = self._forward(
            self.causal_cache, q_pos, q_pos, q_pos < self.plan[0][:, None], kv_len, keep, rule,
            "verify",
        )  # fmt: skip
        self._accept(logits)
        self.proposed = torch.full_like(self.a, -1)

    def _verify_and_draft(self, plan: list[_Row]) -> None:
        """One cache: the verify part (a-1..d-1, causal) and the draft part (the block at s,
        bidirectional, over the causal slots below s) in one forward."""
        b = self.block
        d, s, _, candidates = self.plan
        verify_pos, verify_keep = self._verify_queries(plan)
        qv = verify_pos.shape[1]
        draft_pos = s[:, None] + self.ar_block  # [n, B]
        q_pos = torch.cat([verify_pos, draft_pos], 1)
        slots = torch.cat([verify_pos, draft_pos + b], 1)  # the draft part's scratch slots
        write = torch.cat(
            [verify_pos < d[:, None], torch.ones_like(draft_pos, dtype=torch.bool)], 1
        )
        k = max(max(row.candidates for row in plan), 1)
        targets, valid = self._targets(candidates, k)
        draft_keep = qv + (targets - 1).clamp(min=0)  # shifted logits (targets > 0: never s)
        c = self.c

        def rule(r: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            draft_context = (kv < s[r]) | ((kv >= s[r] + b) & (kv < s[r] + 2 * b))
            return torch.where(q < qv, kv <= c[r] + q, draft_context)

        kv_len = max(row.s for row in plan) + 2 * b
        keep = torch.cat([verify_keep, draft_keep], 1)
        logits = self._forward(self.causal_cache, q_pos, slots, write, kv_len, keep, rule,
                               "verify+draft")  # fmt: skip
        all_accepted = self._accept(logits[:, : verify_keep.shape[1]])
        self._propose(logits[:, verify_keep.shape[1] :], s, targets, valid & all_accepted[:, None])

    def _verify_queries(self, plan: list[_Row]) -> tuple[Tensor, Tensor]:
        """Positions `[n, q]` of the verify queries (c..d-1, padded) and the indices `[n, k]`
        of the logits at a-1..d-1 (padded), which predict positions a..d."""
        q_len = max(row.d - row.c for row in plan)
        k = max(row.d - row.a + 1 for row in plan)
        device = self.a.device
        q_pos = self.c[:, None] + torch.arange(q_len, device=device)
        keep = (self.a - 1 - self.c)[:, None] + torch.arange(k, device=device)
        return q_pos, keep.clamp(max=q_len - 1)

    @staticmethod
    def _targets(candidates: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The candidates' block-relative positions `[n, k]` (first ones first, padded) and
        which are real."""
        order = torch.sort((~candidates).char(), dim=1, stable=True).indices[:, :k]
        return order, candidates.gather(1, order)

    def _propose(
        self,
        logits: Tensor,
        s: Tensor,
        targets: Tensor,
        valid: Tensor,
        forced: Tensor | None = None,
    ) -> None:
        """Draft tokens from block-diffusion logits `[n, k, V]` at `s + targets` where
        `valid`: all of them (`single`), or those whose confidence beats the threshold, at
        least the most confident one, and the `forced` ones."""
        token, confidence = choose_tokens(logits, self.mask_id, 0.0, 1.0, None, self.vocab_limit)
        pick = valid
        if not self.single:
            confidence = confidence.masked_fill(~valid, -torch.inf)
            pick = valid & (confidence > self.threshold)
            if forced is not None:
                pick |= forced
            best = confidence.argmax(1, keepdim=True)
            pick.scatter_(1, best, pick.gather(1, best) | valid.gather(1, best))
        at = s[:, None] + targets
        self.seq.scatter_(1, at, torch.where(pick, token, self.seq.gather(1, at)))
        self.drafted.scatter_(1, at, self.drafted.gather(1, at) | pick)
        self.proposed = torch.where(valid.any(1), pick.sum(1), -1)

    def _accept(self, logits: Tensor) -> Tensor:
        """Verification: from the causal logits `[n, k, V]` at a-1.., accept the longest
        prefix of drafts equal to the causal argmax and the causal argmax after it; mask the
        other drafts again (unless every draft was accepted). Returns that, `[n]`."""
        d = self.plan[0]
        predicted = greedy_token(logits, self.vocab_limit)  # [n, k]: tokens at a, a+1, ...
        t = torch.arange(predicted.shape[1], device=predicted.device)
        drafts = self.seq.gather(1, (self.a[:, None] + t).clamp(max=self.width - 1))
        agree = (predicted == drafts) & (t < (d - self.a)[:, None])
        m = agree.int().cumprod(1).sum(1)  # drafts accepted
        all_accepted = m == d - self.a
        at = (self.a + m)[:, None]  # where the causal argmax after them goes
        bonus = torch.where(
            at < self.limit[:, None], predicted.gather(1, m[:, None]), self.seq.gather(1, at)
        )
        self.seq.scatter_(1, at, bonus)
        new_a = torch.minimum(self.a + m + 1, self.limit)
        after = self.positions >= new_a[:, None]
        rejected = self.drafted & after & ~all_accepted[:, None]
        self.seq.masked_fill_(rejected, self.mask_id)
        self.drafted &= after & ~rejected
        self.accepted = new_a - self.a
        self.c, self.a = self.a + m, new_a
        return all_accepted
