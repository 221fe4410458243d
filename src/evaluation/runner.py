"""Evaluate a decoder on a benchmark: render, decode in batches, score, sum the cost.

`evaluate` renders each problem with the chat template, decodes the prompts in batches
through a `src.decoding.Decoder` (cached parallel decoding, or the AR baseline), scores the
responses and sums what decoding cost. `python -m src.eval` runs it on an export
(`src.evaluation.run`); `src.training.decode_eval.DecodeEval` on a few problems during training::

    decoder = load_decoder("artifacts/tiny", DecodeSettings.defaults())
    evaluation = evaluate(decoder, get("synthetic", n=20), problems, batch_size=8)
    evaluation.metrics("accuracy")["accuracy"], evaluation.samples[0]["response"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from src.decoding import Decoder, GenerationResult, note_untrained_causal_mode
from src.decoding.base import validate_prompts
from src.evaluation.benchmarks import Benchmark

log = logging.getLogger(__name__)

# Benchmarks scored by running the program: their accuracy is pass@1 (greedy, one sample).
CODE_BENCHMARKS = ("humaneval", "mbpp", "humaneval_plus", "mbpp_plus")


def metric_name(benchmark: Benchmark) -> str:
    return "pass@1" if benchmark.name in CODE_BENCHMARKS else "accuracy"


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, problems: Sequence[dict]
) -> list[str]:
    """Each problem's chat prompt as text, ending with the assistant header, or inside the
    assistant's turn where the benchmark opens it (EvalPlus: "... tests:\n```python\n")."""
    texts = []
    for problem in problems:
        messages = benchmark.messages(problem)
        opened = messages[-1]["role"] == "assistant"
        texts.append(
            tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=not opened,
                continue_final_message=opened,
            )
        )
    return texts


def check_context(decoder: Decoder, benchmark: Benchmark, problems: Sequence[dict]) -> None:
    """ValueError (one line) before any decoding when a problem's prompt plus the token budget
    exceeds the model's context (e.g. the protocol's 2048 tokens on a small model)."""
    tokenizer = decoder.tokenizer
    prompts = [
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in render_prompts(tokenizer, benchmark, problems)
    ]
    if prompts:
        validate_prompts(decoder.export.model, prompts, decoder.settings.max_new_tokens)


@dataclass
class Evaluation:
    """Scored samples and what decoding them cost (summable over batches and ranks)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    denoising_steps: int = 0
    unmasked: int = 0
    score_errors: int = 0
    forwards_by_kind: dict[str, int] = field(default_factory=dict)
    iterations: int = 0
    accepted: int = 0

    def add(self, result: GenerationResult) -> None:
        """Count the cost of one decoded batch."""
        self.tokens += result.num_tokens
        self.forwards += result.forwards
        self.seconds += result.seconds
        self.denoising_steps += result.denoising_steps
        self.unmasked += sum(sum(steps) for steps in result.unmasked_per_step)
        for kind, count in result.forwards_by_kind.items():
            self.forwards_by_kind[kind] = self.forwards_by_kind.get(kind, 0) + count
        self.iterations += result.iterations
        self.accepted += sum(sum(a) for a in result.accepted_per_iteration)

    def metrics(self, metric: str) -> dict[str, Any]:
        """Score (`metric` = accuracy or pass@1) and decoding cost.

        `tokens_per_forward` counts a batched forward once (the decoder's definition), over
        forwards of every kind (`forwards_by_kind`, for decoders with several);
        `unmasked_per_step` is the mean parallelism of one sequence's denoising steps
        (1.0 at threshold 1; `decoder=verified`: positions per draft) and
        `acceptance_length` the tokens one verification made final (`decoder=verified`).
        """
        n = len(self.samples)
        return {
            metric: sum(s["score"] for s in self.samples) / n if n else 0.0,
            "num_scored": n,
            "score_errors": self.score_errors,
            "tokens": self.tokens,
            "forwards": self.forwards,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else 0.0,
            "tokens_per_forward": self.tokens / self.forwards if self.forwards else 0.0,
            "unmasked_per_step": (
                self.unmasked / self.denoising_steps if self.denoising_steps else 0.0
            ),
            "forwards_by_kind": dict(self.forwards_by_kind),
            "acceptance_length": self.acceptance_length,
        }

    @property
    def acceptance_length(self) -> float:
        """Tokens made final per verification (0 without any)."""
        return self.accepted / self.iterations if self.iterations else 0.0

    def by_task(self) -> dict[str, float]:
        """Mean score per task family, for benchmarks whose problems name one (synthetic)."""
        scores: dict[str, list[bool]] = {}
        for sample in self.samples:
            if "task" in sample:
                scores.setdefault(sample["task"], []).append(sample["score"])
        return {task: sum(s) / len(s) for task, s in sorted(scores.items())}

    @staticmethod
    def merge(parts: Sequence[Evaluation]) -> Evaluation:
        """Results of ranks that decoded side by side: counts add up, wall time is the longest."""
        merged = Evaluation(seconds=max((p.seconds for p in parts), default=0.0))
        for part in parts:
            merged.samples += part.samples
            merged.tokens += part.tokens
            merged.forwards += part.forwards
            merged.denoising_steps += part.denoising_steps
            merged.unmasked += part.unmasked
            merged.score_errors += part.score_errors
            for kind, count in part.forwards_by_kind.items():
                merged.forwards_by_kind[kind] = merged.forwards_by_kind.get(kind, 0) + count
            merged.iterations += part.iterations
            merged.accepted += part.accepted
        return merged


def evaluate(
    decoder: Decoder,
    benchmark: Benchmark,
    problems: Sequence[dict],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Evaluation:
    """Decode `problems` in batches of `batch_size` and score the responses."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    tokenizer = decoder.tokenizer
    texts = render_prompts(tokenizer, benchmark, problems)
    evaluation = Evaluation()
    responses: list[str] = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=f"{benchmark.name} ({decoder.name})", disable=not progress):
        batch = texts[start : start + batch_size]
        result = decoder.generate(
            [tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
        )
        responses += tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
        evaluation.add(result)
    note_untrained_causal_mode(decoder, evaluation.acceptance_length)
    scores, evaluation.score_errors = score_safely(benchmark, problems, responses)
    evaluation.samples = [
        {"prompt": text, "response": response, "score": bool(score)}
        | ({"task": problem["task"]} if "task" in problem else {})
        for problem, text, response, score in zip(problems, texts, responses, scores, strict=True)
    ]
    return evaluation


def evaluate_distributed(
    decoder: Decoder | None,
    benchmark: Benchmark,
    problems: Sequence[dict],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> Evaluation | None:
    """`evaluate` with the problems spread over the ranks of the process group (rank r takes
    problems r, r + world, ...): every rank gets the merged evaluation, samples in problem
    order, or None when any rank failed (logged). Collective: every rank must call it, whatever
    its share, an empty one included; `decoder` None is a rank that could not set up (it joins,
    and the result is None). Without a process group: `evaluate`, None if it failed."""
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    local: Evaluation | None = None
    try:
        if decoder is None:
            raise RuntimeError("no decoder on this rank")
        local = evaluate(
            decoder, benchmark, problems[rank::world], batch_size=batch_size, progress=progress
        )
    except Exception:
        # Whatever broke (a bad sample, a scorer, the data), the other ranks must not hang.
        log.exception("evaluation of %s failed on rank %d", benchmark.name, rank)
    if world == 1:
        return local
    parts: list[Evaluation | None] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    if any(part is None for part in parts):
        return None
    merged = Evaluation.merge(parts)
    # Back to problem order: sample i of rank r is problem r + i * world.
    longest = max(len(part.samples) for part in parts)
    merged.samples = [p.samples[i] for i in range(longest) for p in parts if i < len(p.samples)]
    return merged


def score_safely(
    benchmark: Benchmark, problems: Sequence[dict], responses: Sequence[str]
) -> tuple[list[bool], int]:
    """Scores, and how many responses the scorer crashed on (those count as wrong).

    A scorer bug on one odd response must cost that sample, not the run's other results.
    """
    try:
        return benchmark.score_many(problems, responses), 0
    except Exception:
        log.warning("%s: score_many failed; scoring one by one", benchmark.name, exc_info=True)
    scores, errors = [], 0
    for problem, response in zip(problems, responses, strict=True):
        try:
            scores.append(bool(benchmark.score(problem, response)))
        except Exception:
            log.warning("%s: scorer failed on a response", benchmark.name, exc_info=True)
            scores.append(False)
            errors += 1
    return scores, errors
