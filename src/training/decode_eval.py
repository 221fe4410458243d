"""`DecodeEval`: decode benchmarks with the current weights during training
(conf/callbacks/decode_eval.yaml)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from src.decoding import Decoder, check_decoder_name, make_decoder
from src.evaluation.benchmarks import Benchmark
from src.evaluation.protocol import benchmark_decode
from src.evaluation.runner import evaluate_distributed, metric_name
from src.model import Export
from src.training.zero import unpartitioned

log = logging.getLogger(__name__)


class DecodeEval(L.Callback):
    """Decode a few problems of each benchmark with the current weights during training.

    Runs every `every_n_steps` optimizer steps and at the end of training. Each rank decodes
    its share of the first `limit` problems (`evaluate_distributed`; under ZeRO-3 with a plain
    copy of the gathered weights); rank 0 logs, per benchmark (named by its key in
    `benchmarks`, or its own name), `decode_eval/<name>/<accuracy|pass@1>`,
    `tokens_per_forward`, `tokens_per_second`, and the callback's own cost: `decode_eval/seconds` (this evaluation) and `decode_eval/overhead`
    (its total time / training time so far). A failure is logged and training goes on.

    `decode` is the run's decode config (`block_size` null: the trained one), under each
    benchmark's protocol (its `decode` block: token budget and threshold, SPEC 4.1; change one
    with `callbacks.decode_eval.benchmarks.<name>.decode.max_new_tokens=N`); `decoder` null
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
        check_decoder_name(decoder)
        for benchmark in benchmarks.values():
            benchmark.check()  # e.g. no sandbox for code: fail before training, not at step N
        self.benchmarks, self.decode = dict(benchmarks), _plain(decode)
        self.limit, self.every_n_steps = limit, every_n_steps
        self.batch_size, self.decoder = batch_size, decoder
        self.history: list[dict[str, float]] = []  # rank 0: the metrics of every evaluation
        self.eval_seconds = 0.0
        self._problems: dict[str, list[dict]] = {}
        self._started = 0.0
        self._last_step = -1
        self._step_at_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self.eval_seconds = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        # Only in the batch that made the optimizer step: with gradient accumulation the step
        # count stays put over the next micro-batches (and a resumed run starts mid-count).
        step = trainer.global_step
        if step != self._step_at_start and step % self.every_n_steps == 0:
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
            # Ranks decode different shards, so their forwards must not depend on each other:
            # under ZeRO-3 decode with a plain copy of the gathered weights (`unpartitioned`).
            with torch.no_grad(), unpartitioned(model) as plain:
                export = Export(plain, pl_module.tokenizer, pl_module.export_settings())
                for label, benchmark in self.benchmarks.items():
                    metrics |= self._evaluate(export, label, benchmark)
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

    def _evaluate(self, export: Export, name: str, benchmark: Benchmark) -> dict[str, float]:
        """The ranks' shards, merged on every rank; metrics under `decode_eval/<name>/`
        (`failed` = 1 when any rank failed)."""
        decoder: Decoder | None = None
        try:
            if name not in self._problems:
                self._problems[name] = benchmark.load(self.limit)
            decode = benchmark_decode(self.decode, benchmark)  # its protocol's budget
            decoder = make_decoder(export, decode, decoder=self.decoder)
        except Exception:
            # Whatever broke (the data, a setting), training goes on; this rank still joins
            # the others' gather, so none of them waits for it.
            log.exception("decode eval of %s failed", name)
        problems = self._problems.get(name, [])
        merged = evaluate_distributed(decoder, benchmark, problems, batch_size=self.batch_size)
        if merged is None:
            return {f"decode_eval/{name}/failed": 1.0}
        metric = metric_name(benchmark)
        result = merged.metrics(metric)
        keys = (metric, "tokens_per_forward", "tokens_per_second", "num_scored")
        if result["acceptance_length"]:  # decoder=verified
            keys += ("acceptance_length",)
        logged = {f"decode_eval/{name}/{key}": float(result[key]) for key in keys}
        # Per task family (synthetic): which part of a benchmark is still being learned.
        by_task = merged.by_task()
        return logged | {f"decode_eval/{name}/{metric}/{t}": v for t, v in by_task.items()}


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)
