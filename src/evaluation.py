"""Evaluate a model on a benchmark through the decoder; the decode-eval training callback.

`evaluate` renders each problem with the chat template, decodes the prompts in batches
through `src.decoding.generate` (or `generate_ar`, the AR baseline), scores the responses and
sums what decoding cost. `python -m src.eval` (src/eval.py) is its command line; `DecodeEval`
runs it on a few problems during training (conf/callbacks/decode_eval.yaml)::

    evaluation = evaluate(model, tokenizer, get("synthetic", n=20), problems,
                          decode=resolve_decode(cfg.decode, settings["block_size"]),
                          mask_token_id=mask_id, stop_token_id=stop_id, batch_size=8)
    evaluation.metrics("accuracy")["accuracy"], evaluation.samples[0]["response"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.benchmarks import Benchmark
from src.config import DECODERS, GENERATE_KEYS, resolve_decode
from src.decoding import generate, generate_ar
from src.distributed import gathered_parameters

log = logging.getLogger(__name__)

# Benchmarks scored by running the program: their accuracy is pass@1 (greedy, one sample).
CODE_BENCHMARKS = ("humaneval", "mbpp")


def metric_name(benchmark: Benchmark) -> str:
    return "pass@1" if benchmark.name in CODE_BENCHMARKS else "accuracy"


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, benchmark: Benchmark, problems: Sequence[dict]
) -> list[str]:
    """Each problem's chat prompt as text, ending with the assistant header."""
    return [
        tokenizer.apply_chat_template(
            benchmark.messages(problem), tokenize=False, add_generation_prompt=True
        )
        for problem in problems
    ]


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

    def metrics(self, metric: str) -> dict[str, float | int]:
        """Score (`metric` = accuracy or pass@1) and decoding cost.

        `tokens_per_forward` counts a batched forward once (the decoder's definition);
        `unmasked_per_step` is the mean parallelism of one sequence's denoising steps
        (1.0 at threshold 1).
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
        }

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
        return merged


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    problems: Sequence[dict],
    *,
    decode: Mapping[str, Any],
    mask_token_id: int | None,
    stop_token_id: int,
    decoder: str = "diffusion",
    batch_size: int = 8,
    progress: bool = False,
    generator: torch.Generator | None = None,
) -> Evaluation:
    """Decode `problems` in batches of `batch_size` and score the responses.

    `decode` is a resolved decode config (`resolve_decode`); `decoder="ar"` decodes greedily
    with `generate_ar` and uses only its `max_new_tokens`.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {', '.join(DECODERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    texts = render_prompts(tokenizer, benchmark, problems)
    evaluation = Evaluation()
    responses: list[str] = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=f"{benchmark.name} ({decoder})", disable=not progress):
        batch = texts[start : start + batch_size]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
        if decoder == "ar":
            result = generate_ar(
                model, ids, stop_token_id=stop_token_id, max_new_tokens=decode["max_new_tokens"]
            )
        else:
            kwargs = {k: decode[k] for k in GENERATE_KEYS}
            result = generate(
                model,
                ids,
                mask_token_id=mask_token_id,
                stop_token_id=stop_token_id,
                generator=generator,
                **kwargs,
            )
        responses += tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
        evaluation.tokens += result.num_tokens
        evaluation.forwards += result.forwards
        evaluation.seconds += result.seconds
        evaluation.denoising_steps += result.denoising_steps
        evaluation.unmasked += sum(sum(steps) for steps in result.unmasked_per_step)
    scores, evaluation.score_errors = score_safely(benchmark, problems, responses)
    evaluation.samples = [
        {"prompt": text, "response": response, "score": bool(score)}
        | ({"task": problem["task"]} if "task" in problem else {})
        for problem, text, response, score in zip(problems, texts, responses, scores, strict=True)
    ]
    return evaluation


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


class DecodeEval(L.Callback):
    """Decode a few problems of each benchmark with the current weights during training.

    Runs every `every_n_steps` optimizer steps and at the end of training. Each rank decodes
    its shard of the first `limit` problems; rank 0 gathers them and logs, per benchmark (named
    by its key in `benchmarks`, or its own name), `decode_eval/<name>/<accuracy|pass@1>`, `tokens_per_forward`, `tokens_per_second`, and the
    callback's own cost: `decode_eval/seconds` (this evaluation) and `decode_eval/overhead`
    (its total time / training time so far). A failure is logged and training goes on.

    `decode` is the run's decode config (`block_size` null: the trained one); `decoder` null
    picks the AR baseline for an `ar` objective and the diffusion decoder otherwise.
    """

    def __init__(
        self,
        benchmarks: Mapping[str, Benchmark] | Sequence[Benchmark],
        decode: Mapping[str, Any],
        *,
        limit: int | None = 16,
        every_n_steps: int = 200,
        batch_size: int = 8,
        decoder: str | None = None,
    ) -> None:
        if not isinstance(benchmarks, Mapping):
            names = [b.name for b in benchmarks]
            if len(set(names)) != len(names):
                raise ValueError(f"decode_eval benchmarks {names}: pass a dict to label repeats")
            benchmarks = dict(zip(names, benchmarks, strict=True))
        if not benchmarks:
            raise ValueError("DecodeEval needs at least one benchmark")
        if limit is not None and limit < 1:
            raise ValueError(f"decode_eval limit={limit} must be >= 1 (or null for all)")
        if every_n_steps < 1 or batch_size < 1:
            raise ValueError("decode_eval every_n_steps and batch_size must be >= 1")
        if decoder is not None and decoder not in DECODERS:
            raise ValueError(f"decode_eval decoder={decoder!r}: choose one of {DECODERS} or null")
        self.benchmarks, self.decode = dict(benchmarks), _plain(decode)
        self.limit, self.every_n_steps = limit, every_n_steps
        self.batch_size, self.decoder = batch_size, decoder
        self.history: list[dict[str, float]] = []  # rank 0: the metrics of every evaluation
        self.eval_seconds = 0.0
        self._problems: dict[str, list[dict]] = {}
        self._started = 0.0
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self.eval_seconds = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """One evaluation of every benchmark; returns (on rank 0) and logs its metrics."""
        self._last_step = trainer.global_step
        started = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        try:
            # Ranks decode different shards, so under ZeRO-3 their forwards cannot gather
            # shards in step: hold full parameters on every rank instead (collective, once).
            with torch.no_grad(), gathered_parameters(model):
                for label, benchmark in self.benchmarks.items():
                    metrics |= self._evaluate(trainer, pl_module, label, benchmark)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - started
        self.eval_seconds += seconds
        elapsed = time.perf_counter() - self._started
        metrics["decode_eval/seconds"] = seconds
        metrics["decode_eval/overhead"] = self.eval_seconds / elapsed if elapsed > 0 else 0.0
        if trainer.is_global_zero:
            self.history.append(metrics)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info("decode eval at step %d: %s", trainer.global_step, metrics)
        return metrics

    def _evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, benchmark: Benchmark
    ) -> dict[str, float]:
        """This rank's shard, gathered on every rank; metrics under `decode_eval/<name>/`
        (`failed` = 1 when any rank failed)."""
        local: Evaluation | None = None
        try:
            if name not in self._problems:
                self._problems[name] = benchmark.load(self.limit)
            shard = self._problems[name][trainer.global_rank :: trainer.world_size]
            trained = pl_module.diffusion
            decoder = self.decoder or ("ar" if trained["objective"] == "ar" else "diffusion")
            local = evaluate(
                pl_module.model,
                pl_module.tokenizer,
                benchmark,
                shard,
                decode=resolve_decode(self.decode, trained["block_size"]),
                mask_token_id=pl_module.mask_token_id,
                stop_token_id=pl_module.tokenizer.eos_token_id,
                decoder=decoder,
                batch_size=self.batch_size,
            )
        except Exception:
            # Whatever broke (a bad sample, a scorer, the data), training must go on.
            log.exception("decode eval of %s failed on rank %d", name, trainer.global_rank)
        parts = _gather(trainer, local)
        if any(part is None for part in parts):
            return {f"decode_eval/{name}/failed": 1.0}
        merged = Evaluation.merge(parts)
        metric = metric_name(benchmark)
        result = merged.metrics(metric)
        keys = (metric, "tokens_per_forward", "tokens_per_second", "num_scored")
        logged = {f"decode_eval/{name}/{key}": float(result[key]) for key in keys}
        # Per task family (synthetic): which part of a benchmark is still being learned.
        by_task = merged.by_task()
        return logged | {f"decode_eval/{name}/{metric}/{t}": v for t, v in by_task.items()}


def _gather(trainer: L.Trainer, local: Evaluation | None) -> list[Evaluation | None]:
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [local]
    parts: list[Evaluation | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, local)
    return parts


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)
