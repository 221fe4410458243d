"""`src.evaluation` and `python -m src.eval` on a tiny real export (random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from src.config import ConfigError
from src.decoding import DecodeSettings, generate, make_decoder
from src.evaluation.benchmarks import get
from src.evaluation.run import evaluate_export
from src.evaluation.runner import evaluate, render_prompts, score_safely
from src.model import load_export
from tests.fixtures.exports import DECODE, make_export

ROOT = Path(__file__).resolve().parents[1]
# Small enough for a few seconds per run.
FAST = ["benchmark.n=5", "decode.max_new_tokens=16", "decode.sub_block_size=4", "batch_size=2"]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("eval") / "export", block_size=8)


@pytest.fixture(scope="session")
def export(export_dir):
    return load_export(str(export_dir))


def eval_cfg(export_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", [f"ckpt={export_dir}", *overrides])


def run_eval(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "src.eval", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_resolve_decode_defaults_to_trained_block_size():
    assert DecodeSettings.resolve(DECODE, 8).block_size == 8
    with pytest.raises(ConfigError, match="allow_block_size_mismatch"):
        DecodeSettings.resolve({**DECODE, "block_size": 16}, 8)
    allowed = {**DECODE, "block_size": 16, "allow_block_size_mismatch": True}
    assert DecodeSettings.resolve(allowed, 8).block_size == 16
    with pytest.raises(ConfigError, match="sub_block_size"):
        DecodeSettings.resolve({**DECODE, "sub_block_size": 3}, 8)


def test_batched_evaluate_gives_each_prompt_its_own_decode(export):
    bench = get("synthetic", n=5)
    problems = bench.load()
    decoder = make_decoder(export, DECODE)
    evaluation = evaluate(decoder, bench, problems, batch_size=2)
    tok = export.tokenizer
    settings = export.settings
    ids = {"mask_token_id": settings["mask_token_id"], "stop_token_id": settings["stop_token_id"]}
    kwargs = decoder.settings.generate_kwargs()
    for text, sample in zip(render_prompts(tok, bench, problems), evaluation.samples, strict=True):
        alone = generate(export.model, [tok(text)["input_ids"]], **ids, **kwargs)
        assert sample["prompt"] == text
        assert sample["response"] == tok.decode(alone.tokens[0], skip_special_tokens=True)
    metrics = evaluation.metrics("accuracy")
    assert metrics["num_scored"] == 5 and 0 < metrics["tokens"] <= 5 * 16
    assert metrics["tokens_per_forward"] == metrics["tokens"] / metrics["forwards"]


def test_accuracy_counts_exact_matches(export, tmp_path):
    """Answers set to the model's own responses for half the problems: accuracy is 0.5."""
    problems = get("synthetic", n=4).load()
    decoder = make_decoder(export, DECODE)
    first = evaluate(decoder, get("synthetic"), problems)
    rows = [
        {**p, "answer": s["response"] if i % 2 == 0 else "no such answer"}
        for i, (p, s) in enumerate(zip(problems, first.samples, strict=True))
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = get("synthetic", path=str(path))
    again = evaluate(decoder, bench, bench.load())
    assert again.metrics("accuracy")["accuracy"] == 0.5
    assert [s["score"] for s in again.samples] == [True, False, True, False]
    assert again.by_task() == {p["task"]: float(i % 2 == 0) for i, p in enumerate(problems)}


class _Crashing(type(get("synthetic"))):
    def score(self, problem: dict, response: str) -> bool:
        if problem["answer"] == "crash":
            raise RuntimeError("scorer bug")
        return True


def test_scorer_crash_costs_only_that_sample():
    problems = [{"answer": "crash"}, {"answer": "fine"}]
    assert score_safely(_Crashing(), problems, ["a", "b"]) == ([False, True], 1)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("benchmark.name=nope", "use one of gsm8k"),
        ("benchmark=gsm8k benchmark.path=/no/such.jsonl", "not found; set benchmark.path"),
        ("limit=0", "limit=0 must be >= 1"),
        ("decode.block_size=16", "allow_block_size_mismatch"),
        ("decoder=beam", "choose one of diffusion, ar"),
    ],
)
def test_bad_input_is_one_line_error(export_dir, tmp_path, override, match):
    cfg = eval_cfg(export_dir, *override.split())
    with pytest.raises(ValueError, match=match) as error:
        evaluate_export(cfg, str(tmp_path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "metrics.json").exists()


def test_checkpoint_without_settings_is_rejected(tmp_path):
    cfg = eval_cfg(tmp_path)
    with pytest.raises(ValueError, match="no diffusion.json"):
        evaluate_export(cfg, str(tmp_path / "run"))


def test_ar_decoder_on_the_same_export(export_dir, tmp_path):
    metrics = evaluate_export(eval_cfg(export_dir, *FAST, "decoder=ar"), str(tmp_path))
    assert metrics["decoder"] == "ar" and metrics["num_scored"] == 5
    assert metrics["unmasked_per_step"] == 1.0


@pytest.mark.slow
def test_cli_writes_metrics_and_samples(export_dir, tmp_path):
    result = run_eval(f"ckpt={export_dir}", *FAST, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert "accuracy" in last and "tokens/s" in last
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["benchmark"] == "synthetic" and metrics["num_scored"] == 5
    assert metrics["decode"]["block_size"] == 8  # the trained one, from diffusion.json
    assert metrics["batch_size"] == 2 and metrics["torch"] and metrics["transformers"]
    assert metrics["tokens_per_second"] > 0 and metrics["forwards"] > 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and set(samples[0]) == {"prompt", "response", "score", "task"}
    tasks = {s["task"] for s in samples}
    assert set(metrics["by_task"]) == tasks and len(tasks) == 4


@pytest.mark.slow
def test_cli_bad_input_exits_with_one_line(tmp_path):
    result = run_eval(f"ckpt={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_multirun_gives_each_threshold_its_own_directory(export_dir, tmp_path):
    result = run_eval(
        "-m",
        f"ckpt={export_dir}",
        *FAST,
        "decode.threshold=1.0,0.5",
        "logger=wandb",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [r["decode"]["threshold"] for r in runs] == [1.0, 0.5]
    assert runs[0]["unmasked_per_step"] == 1.0  # threshold 1: one token per step
    assert runs[0]["forwards"] >= runs[1]["forwards"]
    assert list((tmp_path / "0" / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(export_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m src.eval` (gloo on CPU): rank 0 writes the files, the
    same samples and scores as one process (decoding is batch-invariant)."""
    args = [f"ckpt={export_dir}", *FAST]
    one = run_eval(*args, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "src.eval", *args, f"hydra.run.dir={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two" / "samples.jsonl").read_text() == (
        tmp_path / "one" / "samples.jsonl"
    ).read_text()
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert [m["processes"] for m in metrics] == [1, 2]
    for key in ("accuracy", "num_scored", "tokens", "by_task", "decode"):
        assert metrics[0][key] == metrics[1][key], key
    assert two.stdout.count("metrics:") == 1  # printed by rank 0 only
