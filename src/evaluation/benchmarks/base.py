"""What every benchmark shares: options, loading rows (local jsonl, hub, or built in), scoring."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from src.config import ConfigError
from src.data.jsonl import read_jsonl_lines

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
    # The fields a record needs to be prompted and scored, with their types; `check_record`
    # checks them on every record when the benchmark loads, before any model does.
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {}

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
        """Problems in dataset order; ``limit`` (else the configured one) keeps the first few.

        Every record is checked (``check_record``), not only those kept: a bad file is one
        ``ConfigError`` line naming the file, the line and the field, before anything decodes
        (a record the scorer cannot read would otherwise score 0 and look like a result)."""
        _check_limit(limit)
        limit = limit if limit is not None else self.limit
        rows = self._rows()
        source = self._file or self.hub_name or f"the built-in {self.name} data"
        if not rows:
            raise ConfigError(f"{self.name}: {source} holds no problems: check benchmark.path")
        numbers = self._line_numbers or range(1, len(rows) + 1)
        for number, row in zip(numbers, rows, strict=True):
            try:
                if not isinstance(row, dict):
                    raise ValueError(f"a {type(row).__name__}, not an object")
                self.check_record(row)
            except ValueError as err:
                where = "line" if self._line_numbers else "record"
                raise ConfigError(
                    f"{self.name}: {source} {where} {number}: {err}; fix the data (benchmark.path)"
                ) from None
        return rows[:limit] if limit is not None else rows

    def check_record(self, record: dict) -> None:
        """ValueError naming the field unless each of ``required_fields`` is present with
        its type; benchmarks with more rules extend it."""
        for field, types in self.required_fields.items():
            if field not in record:
                raise ValueError(f"{field}: missing")
            if not isinstance(record[field], types):
                names = " or ".join(
                    t.__name__ for t in (types if isinstance(types, tuple) else (types,))
                )
                raise ValueError(f"{field}: {type(record[field]).__name__}, not {names}")

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

    # The jsonl `_rows` read and each row's line number (None: rows of no file), for errors.
    _file: str | None = None
    _line_numbers: list[int] | None = None

    def _rows(self) -> list[dict]:
        if self.path is not None:
            return self._jsonl_rows(self.path)
        if self.hub_name is not None:
            return self._hub_rows()
        return self._builtin_rows()

    def _jsonl_rows(self, path: str) -> list[dict]:
        numbered = read_jsonl_lines(path, key="benchmark.path")
        self._file, self._line_numbers = str(path), [number for number, _ in numbered]
        return [row for _, row in numbered]

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
