"""Data preparation (`src.data.prepare`, `python -m src.prepare_data`): chat sources, the
Nemotron post-training format as local parquet files, memory-mapped shards, manifest checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from src.config import ConfigError
from src.data.datamodule import ChatDataModule
from src.data.jsonl import write_jsonl
from src.data.prepare import MANIFEST, prepare
from src.data.prepared import PreparedSplit, check_prepared
from src.data.sft import build_sft_dataset
from src.data.sources import iter_chats
from src.data.synthetic import generate_split
from src.data.tokenizer import synthetic_tokenizer
from src.model import ensure_mask_token
from tests.conftest import ROOT, logged

SEQ_LEN, BLOCK = 128, 32
LENGTHS = {"seq_len": SEQ_LEN, "block_size": BLOCK, "pad_to_block": True}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tokenizer = synthetic_tokenizer(tmp_path_factory.mktemp("tok"))
    ensure_mask_token(tokenizer)
    return tokenizer


def nemotron_rows(split: str, n: int, seed: int) -> list[dict]:
    """Synthetic chats in the Llama-Nemotron post-training schema (input messages, output
    answer, reasoning on/off with its system prompt, used_in_training)."""
    rows = []
    for i, item in enumerate(generate_split(split, n, seed=seed)):
        reasoning = "on" if i % 3 == 0 else "off"
        rows.append(
            {
                "input": [item["messages"][0]],
                "output": item["answer"],
                "reasoning": reasoning,
                "system_prompt": f"detailed thinking {reasoning}",
                "used_in_training": "yes",
                "category": item["task"],
            }
        )
    return rows


def write_parquet(path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory) -> dict:
    """A hub-like source: two named subsets as local parquet files."""
    root = tmp_path_factory.mktemp("nemotron")
    files = {
        "code": write_parquet(root / "code" / "0000.parquet", nemotron_rows("train", 90, 1)),
        "math": write_parquet(root / "math" / "0000.parquet", nemotron_rows("train", 60, 2)),
    }
    return {
        "kind": "hub",
        "name": "parquet",
        "data_files": files,
        "splits": ["code", "math"],
        "format": "nemotron",
        "reasoning": "off",
        "where": {"used_in_training": "yes"},
        "n_val": 8,
    }


def test_nemotron_rows_become_chats_interleaved_and_filtered(nemotron):
    chats = list(iter_chats(nemotron, "train")) + list(iter_chats(nemotron, "validation"))
    # reasoning=off keeps 2 of every 3 rows of each subset: 60 + 40.
    assert len(chats) == 100
    first = next(iter_chats(nemotron, "validation"))
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][0]["content"] == "detailed thinking off"
    both = list(iter_chats({**nemotron, "reasoning": "any"}, "validation"))
    code, math = nemotron_rows("train", 90, 1), nemotron_rows("train", 60, 2)
    # One row of each subset in turn.
    assert [c["messages"][-1]["content"] for c in both[:4]] == [
        code[0]["output"],
        math[0]["output"],
        code[1]["output"],
        math[1]["output"],
    ]


def test_prepared_batches_equal_on_the_fly_batches(tok, tmp_path):
    """The same chats (a jsonl file) prepared on the fly and by `prepare`: the same batches."""
    items = generate_split("train", 80, seed=3)
    paths = {}
    for split, part in (("train", items[:64]), ("validation", items[64:])):
        paths[split] = str(tmp_path / f"{split}.jsonl")
        write_jsonl(paths[split], [{"messages": i["messages"]} for i in part])
    source = {"kind": "jsonl", **paths}
    prepared = tmp_path / "prepared"
    prepare(tok, source, out=prepared, **LENGTHS)
    batches = []
    for directory in (None, str(prepared)):
        dm = ChatDataModule(
            tok, source, SEQ_LEN, BLOCK, batch_size=4, prepared=directory, cache_dir=str(tmp_path)
        )
        dm.setup("fit")
        batches.append([b for b in dm.train_dataloader()] + [b for b in dm.val_dataloader()])
    assert len(batches[0]) == len(batches[1]) > 2
    for a, b in zip(*batches, strict=True):
        assert a["input_ids"].dtype == torch.long
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    # And both are what the in-memory packer makes of the chats.
    reference = build_sft_dataset(tok, items[:64], SEQ_LEN, BLOCK)
    split = PreparedSplit(prepared, "train", json.loads((prepared / MANIFEST).read_text()))
    assert [split[i]["input_ids"].tolist() for i in range(len(split))] == reference["input_ids"]


def test_workers_and_token_budget(tok, nemotron, tmp_path):
    one = prepare(tok, nemotron, out=tmp_path / "one", **LENGTHS)
    two = prepare(tok, nemotron, out=tmp_path / "two", num_proc=2, **LENGTHS)
    for split in ("train", "validation"):
        a = PreparedSplit(tmp_path / "one", split, one)
        b = PreparedSplit(tmp_path / "two", split, two)
        assert len(a) == len(b) and all(
            torch.equal(a[i]["labels"], b[i]["labels"]) for i in range(len(a))
        )
    capped = prepare(tok, nemotron, out=tmp_path / "capped", max_tokens=3 * SEQ_LEN + 5, **LENGTHS)
    assert capped["splits"]["train"]["contexts"] == 3
    assert one["splits"]["train"]["contexts"] > 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "auto", "question_only": True}, "no usable chat column"),
        ({"splits": ["code", "nope"]}, "data.source.splits: 'nope'"),
        ({"where": {"used_in_training": "never"}}, "no usable chats"),
        ({"reasoning": "maybe"}, "data.source.reasoning='maybe'"),
    ],
)
def test_bad_sources_are_one_line_errors(tok, nemotron, tmp_path, change, match):
    source = dict(nemotron)
    if change.pop("question_only", False):
        source["data_files"] = {
            "code": write_parquet(tmp_path / "q.parquet", [{"question": "hi", "answer": "yo"}]),
            "math": write_parquet(tmp_path / "q2.parquet", [{"question": "a", "answer": "b"}]),
        }
    source |= change
    with pytest.raises(ConfigError, match=match) as err:
        prepare(tok, source, out=tmp_path / "out", **LENGTHS)
    assert "\n" not in str(err.value)
    # Nothing half-written that training would accept.
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_budget_below_one_context_is_refused(tok, nemotron, tmp_path):
    with pytest.raises(ConfigError, match="less than one context"):
        prepare(tok, nemotron, out=tmp_path / "out", max_tokens=SEQ_LEN - 1, **LENGTHS)


def test_a_prepared_directory_must_match_the_run(tok, nemotron, tmp_path):
    out = tmp_path / "prepared"
    prepare(tok, nemotron, out=out, **LENGTHS)
    check_prepared(out, tokenizer=tok, **LENGTHS)
    with pytest.raises(ConfigError, match=r"seq_len 128 \(run: 256\).*src.prepare_data"):
        check_prepared(out, tokenizer=tok, **{**LENGTHS, "seq_len": 256})
    other = synthetic_tokenizer(tmp_path / "other-tok", vocab_size=320)
    ensure_mask_token(other)
    with pytest.raises(ConfigError, match="tokenizer"):
        check_prepared(out, tokenizer=other, **LENGTHS)
    shard = out / "train" / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ConfigError, match="truncated"):
        ChatDataModule(tok, nemotron, SEQ_LEN, BLOCK, prepared=str(out))
    with pytest.raises(ConfigError, match="does not exist"):
        check_prepared(tmp_path / "never", tokenizer=tok, **LENGTHS)


def test_hub_sources_are_not_prepared_per_run(tok, nemotron):
    with pytest.raises(ConfigError, match="python -m src.prepare_data"):
        ChatDataModule(tok, nemotron, SEQ_LEN, BLOCK)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_prepare_then_train_from_nemotron_parquet(nemotron, tmp_path):
    files = nemotron["data_files"]
    common = [
        "experiment=tiny_ar",
        "data=hub",
        "data.source.name=parquet",
        f"data.source.data_files={{code:{files['code']},math:{files['math']}}}",
        "data.source.splits=[code,math]",
        "data.source.format=nemotron",
        "data.source.reasoning=off",
        "data.source.n_val=8",
        "data.seq_len=128",
        "data.batch_size=4",
        "data.num_workers=0",
        f"paths.artifacts_dir={tmp_path / 'artifacts'}",
    ]
    prepared = tmp_path / "prepared"
    result = run("src.prepare_data", *common, f"out={prepared}", f"hydra.run.dir={tmp_path / 'p'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (prepared / MANIFEST).exists()
    run_dir = tmp_path / "run"
    train = [*common, f"data.prepared={prepared}", f"hydra.run.dir={run_dir}"]
    result = run("src.train", *train, "trainer.max_steps=3", "trainer.val_check_interval=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(logged(run_dir, "val/loss")) == 1
    # Another seq_len than the prepared one: one line that names the command to run.
    result = run("src.train", *train, "data.seq_len=64", "trainer.max_steps=1")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error:") and "python -m src.prepare_data" in last
