"""JSON-lines files: chat data (`data.source`), benchmark problems (`benchmark.path`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from src.config import ConfigError


def read_jsonl(path: str | Path, key: str = "the path") -> list[dict]:
    """Objects of a jsonl file, blank lines skipped. A missing file or a line that is not JSON
    is a one-line ConfigError naming the file (and the config `key` that set it)."""
    return [row for _, row in read_jsonl_lines(path, key)]


def read_jsonl_lines(path: str | Path, key: str = "the path") -> list[tuple[int, dict]]:
    """`read_jsonl` with each object's line number (for errors that name the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} not found; set {key}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{path}:{number} is not valid JSON ({err.msg}); fix or remove the line"
                ) from None
    return rows


def write_jsonl(path: str | Path, items: Iterable[dict]) -> None:
    """One JSON object per line (the chat jsonl format: each object has ``messages``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
