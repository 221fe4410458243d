"""`python -m src.bench data`: how fast `prepare` runs and how much memory it holds, by corpus size.

For each source (the synthetic corpus as a jsonl file; the same chats in the Llama-Nemotron
post-training format as parquet), each corpus size (packed tokens) and each `num_proc`, one
`prepare` runs in a fresh process that reads the file lazily; it reports its wall time and its
peak resident memory (and its render workers'), so flat memory across sizes is measured, not
assumed.
"""

from __future__ import annotations

import itertools
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from src.data.jsonl import write_jsonl
from src.data.prepare import prepare
from src.data.sft import render_sample
from src.data.synthetic import generate_split

SOURCES = ("synthetic", "nemotron")


def write_source(kind: str, directory: Path, chats: int) -> dict[str, Any]:
    """`chats` synthetic train chats as a file of `kind`; the hub source that streams it."""
    items = generate_split("train", chats, seed=0)
    if kind == "synthetic":
        path = directory / "chats.jsonl"
        write_jsonl(path, ({"messages": i["messages"]} for i in items))
        return {"kind": "hub", "name": "json", "data_files": {"train": str(path)}, "n_val": 64}
    path = directory / "chats.parquet"
    rows = (
        {"input": [i["messages"][0]], "output": i["answer"], "reasoning": "off",
         "system_prompt": "detailed thinking off"}
        for i in items
    )  # fmt: skip
    writer = None
    for batch in iter(lambda: list(itertools.islice(rows, 10_000)), []):
        table = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return {"kind": "hub", "name": "parquet", "data_files": {"train": str(path)},
            "format": "nemotron", "n_val": 64}  # fmt: skip


def _measured_prepare(queue: Any, tokenizer: PreTrainedTokenizerBase, options: dict) -> None:
    started = time.perf_counter()
    manifest = prepare(tokenizer, **options)
    queue.put(
        {
            "seconds": time.perf_counter() - started,
            "tokens": manifest["splits"]["train"]["tokens"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
    )


def bench_prepare(
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    block_size: int,
    sizes: list[int],
    num_procs: list[int],
    sources: tuple[str, ...] = SOURCES,
) -> list[dict[str, Any]]:
    """One row per (source, size, num_proc): tokens/s and peak memory of a fresh process."""
    sample = [render_sample(tokenizer, i["messages"]) for i in generate_split("train", 200)]
    tokens_per_chat = sum(-(-len(ids) // block_size) * block_size for ids, _ in sample) / 200
    chats = int(max(sizes) / tokens_per_chat * 1.2) + 1000
    rows = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in sources:
            source_dir = Path(tmp) / kind
            source_dir.mkdir()
            source = write_source(kind, source_dir, chats)
            for size, num_proc in itertools.product(sizes, num_procs):
                options = {
                    "source": source,
                    "seq_len": seq_len,
                    "block_size": block_size,
                    "pad_to_block": True,
                    "out": Path(tmp) / f"out-{kind}-{size}-{num_proc}",
                    "num_proc": num_proc,
                    "max_tokens": size,
                }
                queue = context.Queue()
                process = context.Process(
                    target=_measured_prepare, args=(queue, tokenizer, options)
                )
                process.start()
                result = queue.get()
                process.join()
                rows.append({"source": kind, "max_tokens": size, "num_proc": num_proc, **result,
                             "tokens_per_second": result["tokens"] / result["seconds"]})  # fmt: skip
    return rows


def print_prepare_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'source':10} {'tokens':>11} {'num_proc':>8} {'seconds':>8} {'tokens/s':>10} "
        f"{'peak MiB':>9} {'workers MiB':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['source']:10} {r['tokens']:11,d} {r['num_proc']:8d} {r['seconds']:8.1f} "
            f"{r['tokens_per_second']:10,.0f} {r['peak_rss_mib']:9.0f} {r['workers_peak_rss_mib']:11.0f}"
        )


def extrapolate(rows: list[dict[str, Any]], tokens: float = 1.3e9, cores: int = 32) -> str:
    """Hours to prepare `tokens` on `cores` workers, from the largest run of each source with
    the most workers, assuming throughput scales with workers as measured from 1 to that."""
    lines = []
    for kind in dict.fromkeys(r["source"] for r in rows):
        mine = [r for r in rows if r["source"] == kind]
        size = max(r["max_tokens"] for r in mine)
        by_proc = {r["num_proc"]: r["tokens_per_second"] for r in mine if r["max_tokens"] == size}
        most = max(by_proc)
        scaling = by_proc[most] / by_proc[min(by_proc)] / (most / min(by_proc))
        rate = by_proc[most] / most * cores * scaling
        lines.append(
            f"{kind}: {by_proc[most]:,.0f} tokens/s on {most} worker(s) (scaling efficiency "
            f"{scaling:.2f} from {min(by_proc)}); {tokens:.2g} tokens on {cores} cores: "
            f"~{tokens / rate / 3600:.1f} h"
        )
    return "\n".join(lines)
