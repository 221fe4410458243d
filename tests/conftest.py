"""Shared test fixtures: real (tiny, random-init) HF models, never mocks."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

TINY_CONFIGS = {
    "qwen2": Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "llama": LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}


def tiny_model(
    arch: str = "qwen2", vocab_size: int = 64, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    config = copy.deepcopy(TINY_CONFIGS[arch])  # _from_config mutates and shares its config
    config.vocab_size = vocab_size
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=["qwen2", "llama"])
def arch(request) -> str:
    return request.param


ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per run on 2 CPU cores.
SMALL = [
    "data.source.n_train=96",
    "data.source.n_val=16",
    "data.seq_len=128",
    "data.batch_size=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


def run_train(run_dir: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", *SMALL, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """`key` by step, over every CSV version (one per attempt) of a run."""
    values = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """A real tiny_ar export (a few steps from scratch): the AR-init of the `tiny` family."""
    art = tmp_path_factory.mktemp("artifacts")
    run_train(
        art / "tiny_ar_run",
        "experiment=tiny_ar",
        f"paths.artifacts_dir={art}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        # Not a divisor of max_steps: the run's final step is checkpointed all the same
        # (`FinalCheckpoint`; tests/test_train.py and test_guards.py rely on it).
        "callbacks.model_checkpoint.every_n_train_steps=4",
    )
    return art
