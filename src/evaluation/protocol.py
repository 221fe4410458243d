"""The released evaluation protocol (SPEC 4.1) as this pipeline runs it.

A benchmark's protocol is its config's `decode` block (the token budget and the threshold:
2048 and 1 for the paper's generated tasks, `Benchmark.decode`) and its prompt; every prompt
is rendered with the export's chat template, 0-shot, and decoding stops at the token that ends
an assistant turn (the export's `stop_token`). `src.eval` takes the block through conf/eval.yaml
(so `decode.*` on the command line wins); where one decode config serves several benchmarks
(`callbacks=decode_eval`, `python -m src.paper`) `benchmark_decode` applies it.
`protocol_record` is what metrics.json says about the protocol a run used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.decoding import Decoder
from src.evaluation.benchmarks import Benchmark


def benchmark_decode(
    decode: Mapping[str, Any], benchmark: Benchmark, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The decode config `benchmark` is decoded with: `decode`, the benchmark's protocol on
    top, and on top of that the `overrides` that are not None."""
    if isinstance(decode, DictConfig):
        decode = OmegaConf.to_container(decode, resolve=True)
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    return {**decode, **benchmark.decode, **chosen}


def protocol_record(benchmark: Benchmark, decoder: Decoder, limit: int | None) -> dict[str, Any]:
    """The protocol of a run, for metrics.json: the benchmark's protocol values (`released`),
    where this run's differ (`deviations`), and whether the run is the benchmark's full
    released evaluation (`follows`: no deviation, every problem)."""
    used = {"max_new_tokens": decoder.settings.max_new_tokens}
    if decoder.name != "ar":  # the AR baseline has no threshold
        used["threshold"] = decoder.settings.threshold
    deviations = {
        key: value
        for key, value in used.items()
        if key in benchmark.decode and value != benchmark.decode[key]
    }
    return {
        "released": dict(benchmark.decode),
        "deviations": deviations,
        "follows": not deviations and limit is None,
        "prompt": benchmark.prompt,
        "chat_template": True,
        "num_fewshot": 0,
        "stop_token": decoder.export.settings["stop_token"],
    }
