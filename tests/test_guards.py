"""Nothing lost: training guards (divergence, output folders, run-directory lock, resume), and
one-line errors for bad input everywhere, through the real entry points."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.config import ConfigError
from src.decoding import check_export, generate, generate_ar
from src.training.guards import LOCK_FILE, RunDirLock
from tests.conftest import ROOT, SMALL, logged, tiny_model
from tests.fixtures.exports import DECODE, make_export

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def train(run_dir: Path, artifacts: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run(
        "src.train",
        f"hydra.run.dir={run_dir}",
        "experiment=tiny",
        f"paths.artifacts_dir={artifacts}",
        f"paths.export_dir={run_dir}/export",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "trainer.val_check_interval=2",
        *SMALL,
        *overrides,
    )


def checkpoint_weights_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.slow
def test_a_diverged_run_stops_exports_nothing_and_keeps_good_checkpoints(artifacts, tmp_path):
    result = train(
        tmp_path, artifacts, "optim.lr=1e6", "optim.warmup_steps=0", "trainer.max_steps=8"
    )
    assert result.returncode != 0
    assert last_line(result).startswith("error: training diverged: the loss was not finite")
    assert not (tmp_path / "export").exists()
    losses = logged(tmp_path, "train/loss")
    assert max(losses) < 7  # stopped within one step of the first non-finite loss
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert checkpoint_weights_finite(ckpt), ckpt


@pytest.mark.slow
def test_resume_skips_a_broken_checkpoint_and_refuses_other_settings(artifacts, tmp_path):
    assert train(tmp_path, artifacts, "trainer.max_steps=4").returncode == 0
    newest = (tmp_path / "checkpoints" / "last.ckpt").resolve()
    assert newest.name == "step000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    result = train(tmp_path, artifacts, "trainer.max_steps=6", "diffusion.block_size=16")
    assert result.returncode != 0
    assert "diffusion.block_size=32 (this run: 16)" in last_line(result)
    result = train(tmp_path, artifacts, "trainer.max_steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    said = result.stdout + result.stderr  # Hydra logs to stdout
    assert "skipping" in said and "step000004.ckpt" in said
    assert (tmp_path / "export" / "diffusion.json").exists()
    # The second attempt resumed from step 2: its log starts after step 2, not at 0 or 4.
    second = sorted((tmp_path / "csv").glob("version_*"))[-1]
    with open(second / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps and 2 <= min(steps) < 4


@pytest.mark.slow
def test_one_run_per_run_directory(artifacts, tmp_path):
    run_dir = tmp_path / "run"
    lock = RunDirLock(str(run_dir))
    result = train(run_dir, artifacts, "trainer.max_steps=2")
    assert result.returncode != 0
    assert f"in use by another run (PID {os.getpid()}" in last_line(result)
    lock.release()
    # A holder that was killed: its lock goes with it, and the next run takes over.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from src.training.guards import RunDirLock; RunDirLock({str(run_dir)!r}); import time; time.sleep(60)",
        ],
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not json.loads((run_dir / LOCK_FILE).read_text() or "{}").get("pid") == holder.pid:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = train(run_dir, artifacts, "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"taking over {run_dir / LOCK_FILE} from PID {holder.pid}" in result.stdout + result.stderr
    )


def test_decoding_past_the_context_is_an_error_for_every_decoder():
    model = tiny_model(vocab_size=64)  # max_position_embeddings = 512
    prompts = [[1] * 500]
    with pytest.raises(
        ValueError, match="500 tokens \\+ max_new_tokens=20 exceeds the model's context of 512"
    ):
        generate(
            model,
            prompts,
            mask_token_id=63,
            stop_token_id=62,
            block_size=8,
            sub_block_size=4,
            threshold=0.9,
            max_new_tokens=20,
        )
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_ar(model, prompts, stop_token_id=62, max_new_tokens=20)
    assert generate_ar(model, prompts, stop_token_id=62, max_new_tokens=12).tokens


def test_the_diffusion_decoder_refuses_an_ar_export(tmp_path):
    export = make_export(tmp_path / "ar", objective="ar")
    with pytest.raises(ConfigError, match="trained with the AR objective.*decoder=ar"):
        check_export(str(export), DECODE, "diffusion")
    assert check_export(str(export), DECODE, "ar")[0] == "ar"
    assert check_export(str(export), DECODE, None)[0] == "ar"


def test_the_diffusion_decoder_refuses_an_unshifted_export(tmp_path):
    # It reads the logit before each position: an export trained without the token shift
    # would decode to garbage with rc 0.
    export = make_export(tmp_path / "unshifted", token_shift=False)
    with pytest.raises(ConfigError, match="token_shift=false.*retrain with token_shift=true"):
        check_export(str(export), DECODE, None)
    assert check_export(str(export), DECODE, "ar")[0] == "ar"
    assert check_export(str(make_export(tmp_path / "shifted")), DECODE, None)[0] == "diffusion"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, artifacts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "invalid.jsonl").write_text('{"messages": []}\n{not json\n')
    (root / "empty.jsonl").write_text("\n")
    user_only = {"messages": [{"role": "user", "content": "hi"}]}
    (root / "no_answer.jsonl").write_text(json.dumps(user_only) + "\n")
    export = make_export(root / "export")
    broken = make_export(root / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    no_block = make_export(root / "no_block")
    settings = json.loads((no_block / "diffusion.json").read_text())
    del settings["block_size"]
    (no_block / "diffusion.json").write_text(json.dumps(settings))
    malformed = make_export(root / "malformed")
    (malformed / "diffusion.json").write_text("{block_size: 8")
    return {"root": root, "export": export, "broken": broken, "no_block": no_block,
            "malformed": malformed}  # fmt: skip


def jsonl(bad_files: dict, name: str, split: str = "train") -> list[str]:
    other = "validation" if split == "train" else "train"
    return [
        "experiment=tiny_ar", "data=chat_jsonl", f"data.source.{split}={bad_files['root'] / name}",
        f"data.source.{other}={bad_files['root'] / 'empty.jsonl'}",
    ]  # fmt: skip


CASES = {
    # case: (entry point, overrides (a function of the fixtures), the one line's start, a part)
    "chat_jsonl without paths": ("src.train", lambda f: ["experiment=tiny_ar", "data=chat_jsonl"], "config error:", "data.source.train, data.source.validation must be set"),
    "invalid JSON": ("src.train", lambda f: jsonl(f, "invalid.jsonl"), "config error:", "invalid.jsonl:2 is not valid JSON"),
    "empty jsonl": ("src.train", lambda f: jsonl(f, "empty.jsonl"), "config error:", "empty.jsonl is empty"),
    "no assistant turn": ("src.train", lambda f: jsonl(f, "no_answer.jsonl"), "config error:", "no usable chats"),
    "missing file": ("src.train", lambda f: jsonl(f, "nope.jsonl"), "config error:", "nope.jsonl' not found; set data.source.train"),
    "truncated weights": ("src.eval", lambda f: [f"ckpt={f['broken']}"], "error:", "cannot load the export"),
    "no block_size": ("src.eval", lambda f: [f"ckpt={f['no_block']}"], "error:", "diffusion.json lacks block_size"),
    "malformed settings": ("src.eval", lambda f: [f"ckpt={f['malformed']}"], "error:", "diffusion.json is not valid JSON"),
    "eval without ckpt": ("src.eval", lambda f: [], "error:", "pass ckpt=<export dir>"),
    "max_steps not a number": ("src.train", lambda f: ["experiment=tiny_ar", "trainer.max_steps=abc"], "config error:", "trainer.max_steps='abc' must be a number"),
    "max_steps 0": ("src.train", lambda f: ["experiment=tiny_ar", "trainer.max_steps=0"], "config error:", "trainer.max_steps=0 trains nothing"),
    "export dir under a file": ("src.train", lambda f: ["experiment=tiny_ar", f"paths.export_dir={f['root'] / 'empty.jsonl'}/export"], "config error:", "is a file, not a folder"),
    "bench steps not a number": ("src.bench", lambda f: ["train", "experiment=tiny_ar", "bench.steps=abc"], "config error:", "bench.steps=abc"),
    "bench threshold": ("src.bench", lambda f: ["decode", f"ckpt={f['export']}", f"ar_ckpt={f['export']}", "thresholds=[1.5]"], "error:", "decode.threshold=1.5 must be in [0, 1]"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_fix(case, bad_files, artifacts, tmp_path):
    module, overrides, start, part = CASES[case]
    args = [*overrides(bad_files), f"paths.artifacts_dir={artifacts}", f"hydra.run.dir={tmp_path}"]
    result = run(module, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    line = last_line(result)
    assert line.startswith(start) and part in line, line


@pytest.mark.slow
def test_logger_none_trains(artifacts, tmp_path):
    result = train(tmp_path, artifacts, "logger=none", "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "export" / "diffusion.json").exists()
