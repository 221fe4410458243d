"""Chat sources (`data.source`): where the chats of a split come from, as `{"messages": [...]}`.

Kinds (`kind`):
- ``synthetic``: the built-in corpus, ``n_train`` / ``n_val`` / ``n_test`` items of ``seed``;
- ``jsonl``: a small local file per split, under the split's name (``train``, ``validation``,
  ``test``), each line a chat with ``messages``;
- ``hub``: anything `datasets.load_dataset` streams: a hub id (``name``, ``config``) or a local
  builder (``name: parquet | json | arrow`` with ``data_files``). ``splits`` lists the named
  splits (subsets) to read, interleaved row by row; the first ``n_val`` chats of that stream are
  the validation split, the rest the train split. ``format`` maps rows to chats: ``messages``
  (a ``messages`` column), ``nemotron`` (the Llama-Nemotron post-training format: ``input``
  messages, the ``output`` answer, an optional ``system_prompt``), or ``auto`` (by the columns).
  ``reasoning`` keeps Nemotron rows whose ``reasoning`` column is "on" or "off" (``any``: all);
  ``where`` keeps rows whose columns equal the given values.

Hub sources are read lazily, row by row: nothing holds the whole corpus.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from src.config import ConfigError
from src.data.jsonl import read_jsonl
from src.data.synthetic import generate_split

SOURCE_KINDS = ("synthetic", "jsonl", "hub")
FORMATS = ("auto", "messages", "nemotron")
# Keys of a synthetic source giving the number of items per split.
_SYNTHETIC_SIZE_KEYS = {"train": "n_train", "validation": "n_val", "test": "n_test"}


def source_items(source: Mapping[str, Any], split: str) -> list[dict]:
    """The chats of one split of a small source (synthetic, jsonl), as a list."""
    kind = source.get("kind")
    if kind == "synthetic":
        size_key = _SYNTHETIC_SIZE_KEYS[split]
        if size_key not in source:
            raise ValueError(f"synthetic source needs {size_key!r} for the {split} split")
        return generate_split(split, int(source[size_key]), seed=int(source.get("seed", 0)))
    if kind == "jsonl":
        if not source.get(split):
            raise ConfigError(
                f"jsonl source has no path for the {split!r} split: set data.source.{split}"
            )
        rows = read_jsonl(source[split], key=f"data.source.{split}")
        if not rows:
            raise ConfigError(
                f"data.source.{split}={source[split]} is empty: give it chats, one per line"
            )
        return [to_chat(row, "messages", f"{source[split]}:{i + 1}") for i, row in enumerate(rows)]
    if kind == "hub":
        raise ConfigError(
            "a hub source is prepared once, not per run: `python -m src.prepare_data <the run's "
            "overrides> out=<dir>`, then train with data.prepared=<dir>"
        )
    raise ConfigError(f"data.source.kind={kind!r}: use one of {', '.join(SOURCE_KINDS)}")


def iter_chats(source: Mapping[str, Any], split: str) -> Iterator[dict]:
    """The chats of one split, lazily (hub sources stream; small ones are listed)."""
    if source.get("kind") != "hub":
        yield from source_items(source, split)
        return
    n_val = int(source.get("n_val", 0))
    if split == "validation":
        yield from itertools.islice(hub_chats(source), n_val)
    elif split == "train":
        yield from itertools.islice(hub_chats(source), n_val, None)
    else:
        raise ConfigError(f"a hub source has train and validation splits, not {split!r}")


def hub_chats(source: Mapping[str, Any]) -> Iterator[dict]:
    """Every chat of a hub source, its splits interleaved row by row, filters applied."""
    if not source.get("name"):
        raise ConfigError("data.source.name is unset: a hub id, or parquet / json / arrow")
    fmt = source.get("format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"data.source.format={fmt!r}: use one of {', '.join(FORMATS)}")
    reasoning = _reasoning(source.get("reasoning", "any"))
    where = dict(source.get("where") or {})
    streams = [_stream(source, split) for split in _splits(source)]
    for number, row in enumerate(_round_robin(streams)):
        if number == 0:
            fmt = _format_of(row, fmt, source)
        if reasoning != "any" and _reasoning(row.get("reasoning")) != reasoning:
            continue
        if any(row.get(key) != value for key, value in where.items()):
            continue
        yield to_chat(row, fmt, f"row {number} of {source['name']}")


def to_chat(row: Mapping[str, Any], fmt: str, where: str) -> dict:
    """`{"messages": [...]}` (plus the row's `answer` and `task`, if any) from a source row."""
    if fmt == "nemotron":
        messages = [dict(m) for m in row["input"]]
        system = (row.get("system_prompt") or "").strip()
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "assistant", "content": row["output"]})
    else:
        if not isinstance(row.get("messages"), list):
            raise ConfigError(f"{where} has no 'messages' list (keys: {', '.join(row)})")
        messages = row["messages"]
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ConfigError(
                f"{where}: a message is not {{'role': ..., 'content': ...}}: {m!r}"[:300]
            )
    extra = {k: row[k] for k in ("answer", "task") if k in row}
    return {"messages": messages, **extra}


def _format_of(row: Mapping[str, Any], fmt: str, source: Mapping[str, Any]) -> str:
    """The row format: as configured, or (auto) by the columns; one-line error when unusable."""
    columns = set(row)
    fits = {"messages": {"messages"} <= columns, "nemotron": {"input", "output"} <= columns}
    if fmt == "auto":
        fmt = next((f for f, ok in fits.items() if ok), "auto")
    if fmt == "auto" or not fits[fmt]:
        raise ConfigError(
            f"data.source {source['name']} has no usable chat column (columns: "
            f"{', '.join(sorted(columns))}): it needs 'messages', or 'input' and 'output' "
            "(data.source.format=nemotron)"
        )
    return fmt


def _reasoning(value: Any) -> str:
    """'on' / 'off' / 'any' (YAML reads a bare on/off as a boolean)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    value = str(value).lower() if value is not None else "any"
    if value not in ("on", "off", "any"):
        raise ConfigError(f"data.source.reasoning={value!r}: use on, off or any")
    return value


def _splits(source: Mapping[str, Any]) -> list[str]:
    splits = source.get("splits") or ["train"]
    return [splits] if isinstance(splits, str) else list(splits)


def _stream(source: Mapping[str, Any], split: str) -> Iterator[Mapping[str, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(
            source["name"],
            source.get("config"),
            data_files=source.get("data_files"),
            split=split,
            streaming=True,
        )
    except (ValueError, KeyError) as err:  # an unknown split or config names the known ones
        raise ConfigError(f"data.source.splits: {split!r}: {str(err).splitlines()[0]}") from None
    except FileNotFoundError as err:
        raise ConfigError(f"data.source {source['name']}: {str(err).splitlines()[0]}") from None
    return iter(data)


def _round_robin(streams: list[Iterator[Mapping[str, Any]]]) -> Iterator[Mapping[str, Any]]:
    """One row of each stream in turn, until all are exhausted."""
    active = list(streams)
    while active:
        for stream in list(active):
            row = next(stream, None)
            if row is None:
                active.remove(stream)
            else:
                yield row
