"""The AR baseline: greedy decoding, written out (no HF `generate`), with the same stop rule.

Why not `generate`: transformers fills every generation option left unset from the model's
own `generation_config.json`, which exports inherit from their AR-init (Qwen2.5-7B-Instruct's
sets `repetition_penalty: 1.05`, `top_k: 20`, `top_p: 0.8`, `do_sample: true`), so the
"greedy" baseline would run with a penalty the diffusion decoder does not. Here each new token
is the argmax of the causal next-token logit, and nothing else: no penalty, no warper, no
forced or suppressed token except ids past the tokenizer (`vocab_limit`).

Batching is exact the way cached parallel decoding's is (`src.decoding.block`): the KV cache
is indexed by absolute position (`src.decoding.cache.PositionCache`), every row sits at its
own positions with no padding, and a causal mask is the block-causal rule with blocks of one
token; rows that stop leave the batch.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import PreTrainedModel

from src.decoding.base import GenerationResult, validate_prompts, vocab_size
from src.decoding.cache import PositionCache, attention_inputs, block_causal


def generate_ar(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    stop_token_id: int,
    max_new_tokens: int,
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Greedy AR decoding of a batch of prompts (any lengths) over a KV cache.

    `tokens[i]` ends at (and includes) the stop token or holds `max_new_tokens` ids;
    `forwards` = the prefill plus one forward per later token of the longest row. Ids from
    `vocab_limit` on (embedding rows no token has) are never emitted.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= stop_token_id < vocab_size(model):
        raise ValueError(f"stop_token_id {stop_token_id} is outside the model's vocabulary")
    validate_prompts(model, prompt_ids, max_new_tokens)
    started = time.perf_counter()
    with torch.inference_mode():
        tokens, forwards = _greedy(model, prompt_ids, stop_token_id, max_new_tokens, vocab_limit)
    seconds = time.perf_counter() - started
    return GenerationResult(tokens, forwards, seconds, [[1] * len(t) for t in tokens])


def greedy_token(logits: Tensor, vocab_limit: int | None) -> Tensor:
    """`[..., V]` -> `[...]`: the most likely id below `vocab_limit` (in float32, as HF's
    greedy search): the causal mode's choice, which `decoder=verified` checks drafts against."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if vocab_limit is not None:
        logits[..., vocab_limit:] = -torch.inf
    return logits.argmax(-1)


def _greedy(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    stop_token_id: int,
    max_new_tokens: int,
    vocab_limit: int | None,
) -> tuple[list[list[int]], int]:
    device = model.device
    plen = torch.tensor([len(p) for p in prompt_ids], device=device)  # [n]
    width = int(plen.max())
    seq = torch.zeros(len(prompt_ids), width + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        seq[i, : len(p)] = torch.tensor(p, device=device)
    cache = PositionCache(model.config.num_hidden_layers, seq.shape[1])
    # Prompts of one length keep every row at the same position: each step's query then sees
    # every slot, and the forward needs no mask (SDPA's fused kernels, `attention_inputs`).
    aligned = len({len(p) for p in prompt_ids}) == 1

    def forward(q_pos: Tensor, kv_len: int, keep: Tensor) -> Tensor:
        """Next-token logits `[n, V]` at query index `keep` `[n, 1]` of the tokens at `q_pos`."""
        cache.plan(q_pos, None, kv_len)
        # Causal = block-causal with blocks of one token.
        rule = None if aligned and q_pos.shape[1] == 1 else block_causal(q_pos[:, 0], 1)
        mask = attention_inputs(model, rule, q_pos.shape[0], q_pos.shape[1], kv_len)
        return model(
            input_ids=seq.gather(1, q_pos),
            position_ids=q_pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
            **mask,
        ).logits[:, 0]

    # Prefill every row's prompt at positions [0, width): a shorter row computes junk past its
    # prompt, in slots its own next tokens overwrite before anything attends them.
    q_pos = torch.arange(width, device=device).expand(len(prompt_ids), width)
    token = greedy_token(forward(q_pos, width, (plen - 1)[:, None]), vocab_limit)
    forwards, pos, ids = 1, plen, torch.arange(len(prompt_ids), device=device)
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    while True:
        seq.scatter_(1, pos[:, None], token[:, None])
        # Rows advance in lockstep: each has `forwards` new tokens, the newest at `pos`.
        done = (token == stop_token_id) | (forwards >= max_new_tokens)  # [n]
        if done.any():
            for row in done.nonzero()[:, 0].tolist():
                tokens[int(ids[row])] = seq[row, int(plen[row]) : int(pos[row]) + 1].tolist()
            keep = (~done).nonzero()[:, 0]
            if len(keep) == 0:
                return tokens, forwards
            seq, pos, plen, ids = seq[keep], pos[keep], plen[keep], ids[keep]
            cache.select_rows(keep)
        # Slots up to the longest row's newest token (a shorter row masks the rest).
        logits = forward(pos[:, None], width + forwards, torch.zeros_like(pos)[:, None])
        token = greedy_token(logits, vocab_limit)
        forwards, pos = forwards + 1, pos + 1
