"""`DecodeEval` inside a real Lightning fit of a tiny DiffusionLM (random init)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from src.data.tokenizer import synthetic_tokenizer
from src.evaluation.benchmarks import get
from src.model import ensure_mask_token
from src.training.decode_eval import DecodeEval
from src.training.module import DiffusionLM
from tests.fixtures.exports import DECODE, TINY_CONFIG

BLOCK = 8
DIFFUSION = {
    "objective": "block_diffusion",
    "block_size": BLOCK,
    "pad_to_block": True,
    "complementary": True,
    "token_shift": True,
    "eps": 1e-3,
    "shared_clean_stream": True,
}
OPTIM = {
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "weight_decay": 0.0,
    "warmup_steps": 1,
    "min_lr_ratio": 0.1,
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = synthetic_tokenizer(tmp_path_factory.mktemp("tok"))
    ensure_mask_token(tok)
    return tok


def batches(tokenizer, n: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer) - 1, (n, 4 * BLOCK), generator=generator)
    labels = ids.clone()
    labels[:, :BLOCK] = -100  # an unsupervised "prompt" block
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]
    return DataLoader(rows, batch_size=2)


class ModeRecorder(L.Callback):
    """Whether the model was in train mode at each training step."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.modes.append(pl_module.model.training)


def fit(tokenizer, tmp_path, callback: DecodeEval, max_steps: int = 4) -> ModeRecorder:
    module = DiffusionLM(tokenizer, {"config": TINY_CONFIG}, DIFFUSION, OPTIM)
    recorder = ModeRecorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback, recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=batches(tokenizer))
    assert trainer.global_step == max_steps
    return recorder


class CrashingScorer(type(get("synthetic"))):
    def score(self, problem: dict, response: str) -> bool:
        raise RuntimeError("scorer bug")


def test_logs_every_n_steps_and_at_the_end(tokenizer, tmp_path):
    callback = DecodeEval({"synthetic": get("synthetic", n=3)}, DECODE, limit=3, every_n_steps=2)
    recorder = fit(tokenizer, tmp_path, callback, max_steps=5)
    # Steps 2 and 4, and the end of fit (step 5).
    assert len(callback.history) == 3
    metrics = callback.history[-1]
    assert metrics["decode_eval/synthetic/num_scored"] == 3
    assert 0 <= metrics["decode_eval/synthetic/accuracy"] <= 1
    # The first 3 problems come from three families: their scores average to the overall one.
    per_task = {k: v for k, v in metrics.items() if k.startswith("decode_eval/synthetic/accuracy/")}
    assert len(per_task) == 3
    assert sum(per_task.values()) / 3 == pytest.approx(metrics["decode_eval/synthetic/accuracy"])
    assert metrics["decode_eval/synthetic/tokens_per_forward"] > 0
    assert metrics["decode_eval/synthetic/tokens_per_second"] > 0
    assert 0 < metrics["decode_eval/overhead"] < 1 and metrics["decode_eval/seconds"] > 0
    assert all(recorder.modes)  # back in train mode after each evaluation
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "decode_eval/synthetic/accuracy" in logged


def test_failures_never_stop_training(tokenizer, tmp_path):
    benchmarks = {
        "crashing": CrashingScorer(n=2),
        "missing": get("synthetic", path=str(tmp_path / "missing.jsonl")),
        "synthetic": get("synthetic", n=2),
    }
    callback = DecodeEval(benchmarks, DECODE, limit=2, every_n_steps=2)
    fit(tokenizer, tmp_path, callback, max_steps=2)
    (metrics,) = callback.history
    assert metrics["decode_eval/missing/failed"] == 1.0
    assert metrics["decode_eval/crashing/accuracy"] == 0.0  # scorer crashes count as wrong
    assert metrics["decode_eval/crashing/num_scored"] == 2
    assert metrics["decode_eval/synthetic/num_scored"] == 2


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="limit"):
        DecodeEval([get("synthetic")], DECODE, limit=0)
    with pytest.raises(ValueError, match="label repeats"):
        DecodeEval([get("synthetic"), get("synthetic", n=3)], DECODE)
    with pytest.raises(ValueError, match="decoder"):
        DecodeEval([get("synthetic")], DECODE, decoder="beam")
