"""What every benchmark shares: options, loading rows (local jsonl, hub, or built in), scoring."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from src.data.jsonl import read_jsonl

# The decode settings a benchmark's protocol fixes (SPEC 4.1: its budget and threshold); the
# rest of the decode config is the decoder's.
PROTOCOL_KEYS = ("max_new_tokens", "threshold")


class Benchmark:
    """A benchmark: ``load`` problems, build their chat ``messages``, ``score`` a response.

    Options (all from ``conf/benchmark/<name>.yaml`` or ``get(name, **options)``): ``path`` a
    local jsonl (wins when set), else ``hub_name``/``hub_config``/``split`` for
    ``datasets.load_dataset``; ``limit`` keeps the first problems only; ``decode`` the
    released protocol's decode settings for this benchmark (``PROTOCOL_KEYS``), which
    ``src.eval`` and ``callbacks=decode_eval`` decode it with unless told otherwise.
    """

    name: str = ""
    # The user turn's template where the config sets one (GSM8K, MATH), for metrics.json.
    prompt: str | None = None

    def __init__(
        self,
        *,
        path: str | None = None,
        hub_name: str | None = None,
        hub_config: str | None = None,
        split: str = "test",
        limit: int | None = None,
        decode: Mapping[str, Any] | None = None,
    ) -> None:
        _check_limit(limit)
        self.path, self.hub_name, self.hub_config = path, hub_name, hub_config
        self.split, self.limit = split, limit
        self.decode = dict(decode or {})
        if unknown := sorted(set(self.decode) - set(PROTOCOL_KEYS)):
            raise ValueError(
                f"benchmark.decode.{unknown[0]}: a benchmark's protocol sets only "
                f"{', '.join(PROTOCOL_KEYS)} (the other settings are decode.*)"
            )

    def load(self, limit: int | None = None) -> list[dict]:
        """Problems in dataset order; ``limit`` (else the configured one) keeps the first few."""
        _check_limit(limit)
        limit = limit if limit is not None else self.limit
        rows = self._rows()
        return rows[:limit] if limit is not None else rows

    def check(self) -> None:
        """Raise ``ConfigError`` (one line) when this benchmark cannot score here; called at the
        start of an evaluation, before the model loads. Nothing to check by default."""

    def execution(self) -> dict[str, object] | None:
        """How model-written code runs (for metrics.json), or None for a benchmark running none."""
        return None

    def messages(self, problem: dict) -> list[dict[str, str]]:
        """The chat prompt, to be rendered with the tokenizer's chat template by the caller."""
        raise NotImplementedError

    def score(self, problem: dict, response: str) -> bool:
        """Whether the model's chat ``response`` solves ``problem``."""
        raise NotImplementedError

    def score_many(
        self, problems: Sequence[dict], responses: Sequence[str], workers: int | None = None
    ) -> list[bool]:
        """``score`` over pairs; code benchmarks run their programs in parallel."""
        check_pairs(problems, responses)
        return [self.score(p, r) for p, r in zip(problems, responses, strict=True)]

    def _rows(self) -> list[dict]:
        if self.path is not None:
            return read_jsonl(self.path, key="benchmark.path")
        if self.hub_name is not None:
            return self._hub_rows()
        return self._builtin_rows()

    def _hub_rows(self) -> list[dict]:
        import datasets

        try:
            data = datasets.load_dataset(self.hub_name, self.hub_config, split=self.split)
        except Exception as error:  # datasets raises many types; offline is the usual cause
            raise ValueError(
                f"{self.name}: cannot load hub dataset {self.hub_name!r} ({type(error).__name__}); "
                f"offline, set benchmark.path to a local jsonl copy"
            ) from error
        return [dict(row) for row in data]

    def _builtin_rows(self) -> list[dict]:
        raise ValueError(f"{self.name}: no data source; set benchmark.path or benchmark.hub_name")


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"benchmark limit must be >= 1 (or null for all), got {limit}")


def check_pairs(problems: Sequence[dict], responses: Sequence[str]) -> None:
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses; pass one each")
