"""`python -m src.generate` and `python -m src.bench decode` through real subprocesses, on a
tiny random Qwen2 export with the synthetic tokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from src.decoding import Chat, make_decoder
from src.generate import check_config
from src.model import load_export
from tests.fixtures.exports import make_export

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 8
MAX_NEW = 12
STATS = re.compile(
    r"^\[(\d+) tokens \| (\d+) forwards \| ([\d.]+) tokens/forward \| ([\d.]+|inf) tokens/s\]$"
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A block-diffusion export (block size 8) of a random tiny Qwen2."""
    return str(make_export(tmp_path_factory.mktemp("gencli") / "export", block_size=BLOCK))


def run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def answers_and_stats(stdout: str) -> list[tuple[str, tuple[int, int, float]]]:
    """(answer, (tokens, forwards, tokens/forward)) per turn; the answer precedes its stats."""
    turns, answer = [], []
    for line in stdout.split("\n"):  # not splitlines: random bytes may hold \x1c etc.
        match = STATS.match(line)
        if match:
            tokens, forwards, per_forward = match.groups()[:3]
            turns.append(("\n".join(answer), (int(tokens), int(forwards), float(per_forward))))
            answer = []
        else:
            answer.append(line)
    return turns


def expected_replies(export_dir: str, users: list[str], **decode) -> list[str]:
    """What `Chat` answers in-process, the CLI's defaults otherwise."""
    export = load_export(export_dir)
    defaults = dict(block_size=BLOCK, sub_block_size=8, threshold=0.9, max_new_tokens=MAX_NEW)
    defaults |= dict(use_sub_block_cache=False, temperature=0.0, top_p=1.0) | decode
    chat = Chat(make_decoder(export, defaults, decoder="diffusion"))
    return [chat.reply(user)[0] for user in users]


def test_prompt_prints_answer_and_stats(export_dir: str) -> None:
    proc = run(
        "src.generate",
        f"ckpt={export_dir}",
        "prompt=Sort: 3 1 2",
        f"decode.max_new_tokens={MAX_NEW}",
        "decode.sub_block_size=4",
        "decode.threshold=0.5",
    )
    assert proc.returncode == 0, proc.stderr
    [(answer, (tokens, forwards, per_forward))] = answers_and_stats(proc.stdout)
    assert 1 <= tokens <= MAX_NEW and forwards >= 1
    assert per_forward == pytest.approx(tokens / forwards, abs=0.01)
    assert (
        answer == expected_replies(export_dir, ["Sort: 3 1 2"], sub_block_size=4, threshold=0.5)[0]
    )


def test_block_size_mismatch_is_an_error_unless_allowed(export_dir: str) -> None:
    proc = run("src.generate", f"ckpt={export_dir}", "prompt=hi", "decode.block_size=4")
    assert proc.returncode != 0
    assert "allow_block_size_mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run(
        "src.generate",
        f"ckpt={export_dir}",
        "prompt=hi",
        "decode.block_size=4",
        "decode.sub_block_size=4",
        "decode.allow_block_size_mismatch=true",
        f"decode.max_new_tokens={MAX_NEW}",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(answers_and_stats(proc.stdout)) == 1


def test_chat_reads_turns_from_stdin(export_dir: str) -> None:
    users = ["Sort: 3 1 2", "Reverse: a b c"]
    proc = run(
        "src.generate",
        f"ckpt={export_dir}",
        "chat=true",
        f"decode.max_new_tokens={MAX_NEW}",
        stdin="\n".join(users) + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    turns = answers_and_stats(proc.stdout)
    # The second answer is conditioned on the first turn: the conversation accumulates.
    assert [answer for answer, _ in turns] == expected_replies(export_dir, users)


def compose_generate(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("generate", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt=hi"], "no diffusion.json"),  # ckpt points at no export
        ([], "exactly one of"),  # neither prompt nor chat
        (["prompt=hi", "chat=true"], "exactly one of"),
        (["prompt=hi", "decoder=beam"], "decoder='beam'"),
        (["prompt=hi", "decode.sub_block_size=5"], "decode.sub_block_size=5"),
        (["prompt=hi", "decode.block_size=16"], "allow_block_size_mismatch"),
    ],
)
def test_bad_config_is_a_clear_error(export_dir: str, overrides: list[str], message: str) -> None:
    ckpt = export_dir + "/missing" if message == "no diffusion.json" else export_dir
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(compose_generate([f"ckpt={ckpt}", *overrides]))


def test_decode_block_size_comes_from_the_export(export_dir: str) -> None:
    decode = check_config(compose_generate([f"ckpt={export_dir}", "prompt=hi"]))
    assert decode.block_size == BLOCK


@pytest.mark.slow
def test_bench_decode_smoke(export_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run(
        "src.bench",
        "decode",
        f"ckpt={export_dir}",
        f"ar_ckpt={export_dir}",
        "limit=2",
        "thresholds=[1.0,0.5]",
        "sub_block_cache=[false,true]",
        "batch_sizes=[1,2]",
        "decode.max_new_tokens=8",
        f"out={out}",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 2 and report["decode"]["block_size"] == BLOCK
    rows = {r["variant"]: r for r in report["rows"]}
    # Per batch size: AR on ar_ckpt, AR on ckpt, 2 thresholds x cache off/on, verified with
    # single drafts and threshold drafts at 2 thresholds.
    assert len(rows) == 2 * (2 + 2 * 2 + 1 + 2)
    verified = [r for r in rows.values() if r["decoder"] == "verified"]
    assert all(r["same_as_ar_ckpt"] == 1.0 and r["acceptance_length"] >= 1 for r in verified)
    assert rows["verified draft=threshold t=0.5 bs=2"]["draft"] == "threshold"
    assert rows["ar (ar_ckpt) bs=1"]["speedup_vs_ar"] == 1.0
    for r in rows.values():
        assert 0 < r["tokens"] <= 2 * 8 and r["forwards"] > 0 and 0 <= r["accuracy"] <= 1
    # threshold 1.0 unmasks one token per denoising step (plus a commit forward per block).
    assert rows["diffusion t=1.0 cache=off bs=1"]["tokens_per_forward"] <= 1.0
    assert "diffusion t=0.5 cache=on bs=2" in proc.stdout
