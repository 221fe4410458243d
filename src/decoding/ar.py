"""The AR baseline: greedy decoding with HF `generate` (KV cache), the same stop rule."""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, PreTrainedModel

from src.decoding.base import GenerationResult, validate_prompts, vocab_size


def generate_ar(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    stop_token_id: int,
    max_new_tokens: int,
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Greedy AR decoding with HF `generate` (KV cache): the baseline for `generate`.

    Prompts are left-padded into one batch; `forwards` = decoding steps taken. Ids from
    `vocab_limit` on (embedding rows no token has) are never emitted.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= stop_token_id < vocab_size(model):
        raise ValueError(f"stop_token_id {stop_token_id} is outside the model's vocabulary")
    validate_prompts(model, prompt_ids, max_new_tokens)
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
        suppress_tokens=list(range(vocab_limit, vocab_size(model))) if vocab_limit else None,
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
