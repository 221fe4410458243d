"""Nothing lost: training guards (divergence, output folders, run-directory lock, resume), and
one-line errors for bad input everywhere, through the real entry points."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.config import ConfigError
from src.config.files import atomic_folder, write_text
from src.decoding import check_export, generate, generate_ar
from src.evaluation.sandbox import bwrap_available
from src.model import load_export, read_settings
from src.training.guards import LOCK_FILE, RunDirLock
from tests.conftest import ROOT, SMALL, tiny_model
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


def checkpoint_state(path: Path) -> tuple[dict, dict]:
    """A checkpoint's weights and optimizer state (moments and step counts)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["state_dict"], state["optimizer_states"][0]["state"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same(value, b[key])
        else:
            assert torch.equal(value, b[key]), key


# No periodic checkpoint before the stop (every 5 steps), so the stop writes its own.
DIVERGING = (
    "optim.lr=1e6",
    "optim.warmup_steps=0",
    "trainer.max_steps=8",
    "callbacks.model_checkpoint.every_n_train_steps=5",
)


@pytest.mark.slow
def test_a_diverged_run_checkpoints_its_last_good_step_and_exports_nothing(artifacts, tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    result = train(run_dir, artifacts, *DIVERGING, "callbacks.finite_loss.tolerated_steps=1")
    assert result.returncode != 0
    said = last_line(result)
    # Step 0 is finite; 1 and 2 (the one tolerated, then the stop) are not: skipped.
    assert said.startswith(
        "error: training diverged: the loss or its gradients were not finite from step 1 to 2"
    ), said
    assert f"resume from {ckpts / 'step000003.ckpt'} (the last good step)" in said
    assert not (run_dir / "export").exists()
    assert (ckpts / "last.ckpt").resolve().name == "step000003.ckpt"
    # The state stopped in is that after step 0: the same weights and optimizer moments as a
    # run of that one step, nothing of the non-finite steps applied.
    reference = tmp_path / "reference"
    assert train(reference, artifacts, *DIVERGING, "trainer.max_steps=1").returncode == 0
    stopped = checkpoint_state(ckpts / "last.ckpt")
    assert_same(stopped[0], checkpoint_state(reference / "checkpoints" / "step000001.ckpt")[0])
    assert_same(stopped[1], checkpoint_state(reference / "checkpoints" / "step000001.ckpt")[1])
    # A resume that fails again trains nothing new, so it writes (and rotates out) nothing.
    before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    result = train(run_dir, artifacts, *DIVERGING)
    assert result.returncode != 0
    assert "from step 3 to 3" in last_line(result), last_line(result)
    assert f"resume from {ckpts / 'step000003.ckpt'}" in last_line(result)
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == before


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
    no_tokenizer = make_export(root / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    bad_config = make_export(root / "bad_config")
    (bad_config / "config.json").write_text('{"model_type": "qwen2", "hidden_size": "x"}')
    return {"root": root, "export": export, "broken": broken, "no_block": no_block,
            "malformed": malformed, "no_tokenizer": no_tokenizer, "bad_config": bad_config}  # fmt: skip


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
def test_logger_none_trains(artifacts, tmp_path):
    result = train(tmp_path, artifacts, "logger=none", "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "export" / "diffusion.json").exists()


def run_in_one_process(cases: list[tuple[str, list[str]]], wrapper: list[str] = ()) -> list[dict]:
    """Each (module, args) as `python -m module args`, all in one subprocess
    (tests/fixtures/entry_points.py), started through `wrapper`: the imports are paid once."""
    result = subprocess.run(
        [*wrapper, sys.executable, "-m", "tests.fixtures.entry_points"],
        input=json.dumps(cases),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bad_input_is_one_line_naming_the_fix(bad_files, artifacts, tmp_path):
    """Every case through its real entry point, all in one process (the imports cost more
    than the cases): non-zero exit, no traceback, at most two stderr lines, the last one
    naming the fix, before the work; nothing previously written changed."""
    f, root = bad_files, bad_files["root"]
    (root / "gsm8k.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "2 #### 2"}) + "\n\n"
        + json.dumps({"question": "2+2?"}) + "\n"
    )  # fmt: skip
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps({"benchmark": "synthetic"}))
    bench = ["decode", f"ckpt={f['export']}", f"ar_ckpt={f['export']}", f"out={tmp_path}/b.json"]
    file_dir = root / "empty.jsonl"  # a file where a folder is needed
    cases = {
        # case: (module, args, the one line's start, a part of it)
        case: (module, [*overrides(f), f"paths.artifacts_dir={artifacts}", f"hydra.run.dir={tmp_path}/{i}"], start, part)
        for i, (case, (module, overrides, start, part)) in enumerate(CASES.items())
    } | {
        "empty list": ("src.bench", [*bench, "thresholds=[]"], "error:", "thresholds=[] leaves nothing to measure: pass e.g. thresholds=[0.9]"),
        "bench out under a file": ("src.bench", [*bench, f"out={file_dir}/b.json"], "error:", f"out={file_dir}: {file_dir} is a file, not a folder"),
        "run dir under a file": ("src.train", ["experiment=tiny_ar", f"hydra.run.dir={file_dir}/run"], "config error:", f"hydra.run.dir={file_dir}/run: {file_dir} is a file"),
        "multirun into one export": ("src.train", ["-m", "experiment=tiny_ar", "trainer.max_steps=1,2", f"hydra.sweep.dir={tmp_path}/m", f"paths.artifacts_dir={tmp_path}/art"], "config error:", f"paths.export_dir={tmp_path}/art/tiny_ar is one folder for jobs 0 and 1 of this multirun, the later replacing the earlier: pass paths.export_dir='${{paths.output_dir}}/export'"),
        "max_steps -1": ("src.train", ["experiment=tiny_ar", "trainer.max_steps=-1", f"hydra.run.dir={tmp_path}/t"], "config error:", "trainer.max_steps=-1 without an epoch budget"),
        "no ZeRO checkpoint": ("src.zero_to_hf", [f"{tmp_path}/nope", f"{tmp_path}/out"], "error:", f"{tmp_path}/nope: no such DeepSpeed checkpoint folder; a DeepSpeed training run writes one"),
        "unknown model_args key": ("src.lm_eval_adapter", ["--model", "fast_dllm", "--model_args", f"pretrained={f['export']},threshhold=0.5", "--tasks", "gsm8k"], "error:", "threshhold=0.5: no such model argument; did you mean threshold?"),
        "bad model_args value": ("src.lm_eval_adapter", ["--model", "fast_dllm", "--model_args", f"pretrained={f['export']},threshold=1.5", "--tasks", "gsm8k"], "error:", "decode.threshold=1.5 must be in [0, 1]"),
        "record without its field": ("src.eval", [f"ckpt={f['export']}", "benchmark=gsm8k", f"benchmark.path={root}/gsm8k.jsonl", f"hydra.run.dir={tmp_path}/e"], "error:", f"gsm8k: {root}/gsm8k.jsonl line 3: answer: missing"),
        "empty benchmark file": ("src.eval", [f"ckpt={f['export']}", f"benchmark.path={root}/empty.jsonl", f"hydra.run.dir={tmp_path}/e"], "error:", "empty.jsonl holds no problems"),
        "report without metric": ("src.report", [str(tmp_path / "old")], "error:", "metrics.json lacks the key 'metric'"),
        "data beyond the disk": ("src.prepare_data", ["experiment=tiny_ar", f"out={tmp_path}/prep", "max_tokens=1000000000000000", f"hydra.run.dir={tmp_path}/p"], "config error:", "cannot write the prepared data (max_tokens=1000000000000000)"),
    }  # fmt: skip
    # One loading path: each load fault is the same line from every command that loads.
    load_faults = {"no_tokenizer": "has no tokenizer files", "broken": "cannot load the export",
                   "bad_config": "cannot load the export"}  # fmt: skip
    for fault, said in load_faults.items():
        ckpt = f"ckpt={f[fault]}"
        cases |= {
            f"{fault} (eval)": ("src.eval", [ckpt, f"hydra.run.dir={tmp_path}/e"], "error:", said),
            f"{fault} (generate)": ("src.generate", [ckpt, "prompt=hi"], "error:", said),
            f"{fault} (bench)": ("src.bench", ["decode", ckpt, f"ar_ckpt={f[fault]}", f"out={tmp_path}/b.json"], "error:", said),
            f"{fault} (lm-eval)": ("src.lm_eval_adapter", ["--model", "fast_dllm", "--model_args", f"pretrained={f[fault]}", "--tasks", "gsm8k"], "error:", said),
        }  # fmt: skip
    results = run_in_one_process([(module, args) for module, args, _, _ in cases.values()])
    for (case, (_, _, start, part)), result in zip(cases.items(), results, strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["returncode"] != 0, case
        assert "Traceback" not in result["stderr"], (case, result["stderr"][-2000:])
        assert len(lines) <= 2 and lines[-1].startswith(start) and part in lines[-1], (case, lines)
        if part == load_faults["no_tokenizer"]:
            assert str(f["no_tokenizer"]) in lines[-1] and "re-export it" in lines[-1]
    # Nothing was written where the work would have gone; what was there is unchanged.
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "prep").exists()
    assert not list(tmp_path.glob("e/*.json")) and not (file_dir.parent / "b.json").exists()
    assert json.loads((tmp_path / "old" / "metrics.json").read_text()) == {"benchmark": "synthetic"}


@pytest.mark.slow
@pytest.mark.skipif(not bwrap_available(), reason="bwrap unavailable (make system-deps)")
def test_read_only_output_folders_are_refused_before_the_work(bad_files, artifacts, tmp_path):
    # A read-only mount (bubblewrap's), which binds root too: EROFS, as on a cluster's
    # read-only project space.
    ro = tmp_path / "ro"
    ro.mkdir()
    export = f"ckpt={bad_files['export']}"
    cases = {
        "bench out": ("src.bench", ["decode", export, f"ar_ckpt={bad_files['export']}", f"out={ro}/b.json"], "error:", f"out={ro}: {ro} is not writable"),
        "train run dir": ("src.train", ["experiment=tiny_ar", f"hydra.run.dir={ro}/run"], "config error:", f"hydra.run.dir={ro}/run: {ro} is not writable"),
        "export dir": ("src.train", ["experiment=tiny_ar", f"paths.artifacts_dir={artifacts}", f"paths.export_dir={ro}/export", f"hydra.run.dir={tmp_path}/t"], "config error:", f"paths.export_dir={ro}/export: {ro} is not writable"),
        "eval run dir": ("src.eval", [export, f"hydra.run.dir={ro}/e"], "config error:", f"hydra.run.dir={ro}/e: {ro} is not writable"),
    }  # fmt: skip
    bind = ["bwrap", "--bind", "/", "/", "--ro-bind", str(ro), str(ro), "--dev", "/dev", "--proc", "/proc"]  # fmt: skip
    results = run_in_one_process([(m, args) for m, args, _, _ in cases.values()], bind)
    for (case, (_, _, start, part)), result in zip(cases.items(), results, strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["returncode"] != 0 and "Traceback" not in result["stderr"], (case, lines)
        assert lines[-1].startswith(start) and part in lines[-1], (case, lines)


def test_lists_from_a_scalar_and_scorer_failures_fail_the_run(bad_files, tmp_path):
    f, root = bad_files, bad_files["root"]
    # Rows the synthetic scorer cannot score (no "answer"): each response counts as wrong.
    chat = {"messages": [{"role": "user", "content": "Sort: 3 1 2"}]}
    (root / "unscorable.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    small = ["decode.max_new_tokens=4", "decode.sub_block_size=4", "limit=2"]
    bench = ["decode", f"ckpt={f['export']}", f"ar_ckpt={f['export']}", *small,
             "batch_sizes=1", "thresholds=0.9", "sub_block_cache=false", "verified_drafts=[]",
             f"out={tmp_path}/new/bench.json"]  # fmt: skip
    evaluation = [f"ckpt={f['export']}", f"benchmark.path={root}/unscorable.jsonl", *small,
                  f"hydra.run.dir={tmp_path}/eval"]  # fmt: skip
    scalar, scorer = run_in_one_process([("src.bench", bench), ("src.eval", evaluation)])
    assert scalar["returncode"] == 0, scalar["stderr"][-2000:]
    rows = json.loads((tmp_path / "new" / "bench.json").read_text())["rows"]
    assert [(r["decoder"], r["batch_size"], r["threshold"]) for r in rows] == [
        ("ar", 1, None), ("ar", 1, None), ("diffusion", 1, 0.9)
    ]  # fmt: skip
    assert scorer["returncode"] != 0
    assert (
        "the scorer failed on 2 of 2 responses (more than max_scorer_error_share=0.02)"
        in (scorer["stderr"].strip().splitlines()[-1])
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["score_errors"] == 2 and metrics["num_scored"] == 2


def limit_file_size(limit: int):
    """A preexec_fn: files this process writes past `limit` bytes fail (EFBIG), as on a full
    disk, but for this process only and without root (RLIMIT_FSIZE; Python ignores SIGXFSZ)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def decoded(export: Path) -> list[list[int]]:
    loaded = load_export(str(export))
    stop = loaded.settings["stop_token_id"]
    return generate_ar(loaded.model, [[1, 2, 3]], stop_token_id=stop, max_new_tokens=8).tokens


def test_a_failed_export_keeps_the_last_one_and_a_rerun_only_exports(artifacts, tmp_path):
    # The session's tiny_ar run (6 steps, checkpoints every 4) and its export, copied.
    run_dir, export = tmp_path / "run", tmp_path / "export"
    shutil.copytree(artifacts / "tiny_ar_run", run_dir, symlinks=True)
    shutil.copytree(artifacts / "tiny_ar", export)
    before, files = decoded(export), {p.name: p.read_bytes() for p in export.iterdir()}
    checkpoints = {p.name: p.stat().st_mtime for p in (run_dir / "checkpoints").iterdir()}
    args = [
        sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", "experiment=tiny_ar",
        f"paths.artifacts_dir={artifacts}", f"paths.export_dir={export}", *SMALL,
        "trainer.max_steps=6", "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_train_steps=4",
    ]  # fmt: skip
    # The weights file (~4 MB) cannot be written whole: the rerun's export fails part-way.
    failed = subprocess.run(
        args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        preexec_fn=limit_file_size(1_000_000),
    )  # fmt: skip
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert last_line(failed).startswith(f"config error: cannot write the export to {export}: ")
    assert "needed" in last_line(failed) and "the previous version is kept" in last_line(failed)
    # The previous export is there as it was: same files, loading and decoding as before.
    assert {p.name: p.read_bytes() for p in export.iterdir()} == files
    assert decoded(export) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no temporary left
    # A rerun resumes at the last step: it trains nothing, checkpoints nothing, and exports.
    rerun = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed at step 6, the last: nothing to train" in rerun.stdout + rerun.stderr
    assert {p.name: p.stat().st_mtime for p in (run_dir / "checkpoints").iterdir()} == checkpoints
    newest = sorted((run_dir / "csv").glob("version_*"))[-1] / "metrics.csv"
    with open(newest) if newest.exists() else open(os.devnull) as f:
        assert not any(row.get("train/loss") for row in csv.DictReader(f))
    assert read_settings(str(export))["trained_steps"] == 6 and decoded(export) == before


def test_a_failed_eval_write_keeps_the_previous_run_files(bad_files, tmp_path):
    args = [
        sys.executable, "-m", "src.eval", f"ckpt={bad_files['export']}", "limit=100",
        "batch_size=50", "decode.max_new_tokens=2", "decode.sub_block_size=4",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    first = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.json", "samples.jsonl")}
    assert len(before["samples.jsonl"]) > 10_000 > len(before["metrics.json"])
    # A rerun into the same directory whose samples.jsonl cannot be written whole (writes past
    # 8 kB fail, as on a full disk; the Hydra config and metrics.json would fit).
    failed = subprocess.run(
        [*args, "decode.threshold=0.5"], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=300, preexec_fn=limit_file_size(8_000),
    )  # fmt: skip
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert last_line(failed).startswith(f"error: cannot write samples.jsonl to {tmp_path}/")
    # The previous run's pair is whole and unchanged; no temporary file is left.
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.slow
@pytest.mark.skipif(not bwrap_available(), reason="bwrap unavailable (make system-deps)")
def test_a_full_disk_keeps_the_previous_eval_files(bad_files, tmp_path):
    # A real ENOSPC: the run directory on a 44 KiB tmpfs (bubblewrap's). The first run fits;
    # the second one's samples.jsonl (~29 kB) does not. Copies of the folder after each run
    # are taken out of the mount.
    run, evaluate = "/tmp/full-disk/run", [
        sys.executable, "-m", "src.eval", f"ckpt={bad_files['export']}", "batch_size=50",
        "decode.max_new_tokens=2", "decode.sub_block_size=4", "hydra.run.dir=/tmp/full-disk/run",
    ]  # fmt: skip
    script = " ; ".join([
        shlex.join([*evaluate, "limit=4"]), f"cp -r {run} {tmp_path}/first",
        shlex.join([*evaluate, "limit=200", "decode.threshold=0.5"]), f"cp -r {run} {tmp_path}/second",
    ])  # fmt: skip
    result = subprocess.run(
        ["bwrap", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--size", "45056",
         "--tmpfs", "/tmp/full-disk", "sh", "-c", script],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith(
        f"error: cannot write samples.jsonl to {run}/samples.jsonl: no space left on device ("
    ), said
    assert "the previous version is kept" in said and "Traceback" not in result.stderr
    first, second = (sorted((tmp_path / n).glob("*.json*")) for n in ("first", "second"))
    assert [p.name for p in first] == [p.name for p in second] == ["metrics.json", "samples.jsonl"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_what_a_killed_write_leaves_is_cleared_by_the_next_one(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("old")
    writer = (
        "import sys, time\nfrom src.config.files import atomic_folder\n"
        "with atomic_folder(sys.argv[1]) as tmp:\n"
        "    (tmp / 'weights').write_text('new, half written')\n"
        "    print('writing', flush=True)\n    time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", writer, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "writing\n"
    child.kill()
    child.wait()
    assert len(list(tmp_path.glob("export.tmp-*"))) == 1
    assert (target / "weights").read_text() == "old"
    # The state a kill between the two renames leaves: the previous version moved aside too.
    os.rename(target, tmp_path / f"export.old-{socket.gethostname()}-{child.pid}")
    (tmp_path / f"metrics.tmp-{socket.gethostname()}-{child.pid}.json").write_text("{")
    with atomic_folder(target) as tmp:
        assert (target / "weights").read_text() == "old"  # put back before anything else
        (tmp / "weights").write_text("new")
    write_text(tmp_path / "metrics.json", "{}")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "metrics.json"]
