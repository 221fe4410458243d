"""The built-in synthetic test split (``src.data.synthetic``), scored by exact match."""

from __future__ import annotations

from typing import ClassVar

from src.evaluation.benchmarks.base import Benchmark


class Synthetic(Benchmark):
    """``n`` items of the synthetic "test" split drawn with ``seed`` (or a local jsonl ``path``)."""

    name = "synthetic"
    # `answer` is optional: `src.bench decode` times prompts without one (`src.eval` counts
    # the scorer's failures on them and fails past `max_scorer_error_share`).
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {"messages": list}

    def __init__(self, *, n: int = 200, seed: int = 0, **options: object) -> None:
        super().__init__(**options)
        if n < 1:
            raise ValueError(f"benchmark.n must be >= 1, got {n}")
        self.n, self.seed = n, seed

    def _builtin_rows(self) -> list[dict]:
        from src.data.synthetic import generate_split

        return generate_split("test", self.n, self.seed)

    def messages(self, problem: dict) -> list[dict[str, str]]:
        return [m for m in problem["messages"] if m["role"] != "assistant"]

    def score(self, problem: dict, response: str) -> bool:
        from src.data.synthetic import exact_match

        return exact_match(response, problem["answer"])
