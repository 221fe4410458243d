"""The released evaluation protocol as the benchmarks' defaults (SPEC 4.1, issue 22): each
benchmark config carries its budget, threshold and prompt, src.eval decodes with them unless
the command line says otherwise, metrics.json records them, and a budget beyond the model's
context is a one-line error before any decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from src.evaluation.benchmarks import get
from src.evaluation.protocol import benchmark_decode
from src.evaluation.run import evaluate_export
from src.model import load_export
from src.training.decode_eval import DecodeEval
from tests.conftest import ROOT
from tests.fixtures.exports import DECODE, make_export

GENERATED = ("gsm8k", "math", "humaneval", "mbpp", "humaneval_plus", "mbpp_plus")
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 2 times 5?", "answer": "#### 10"},
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("protocol") / "export", block_size=8)


@pytest.fixture(scope="module")
def gsm8k_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    return str(path)


def eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", ["ckpt=unused", *overrides])


@pytest.mark.parametrize("name", GENERATED)
def test_src_eval_decodes_a_generated_task_with_the_released_budget(name: str) -> None:
    decode = eval_cfg(f"benchmark={name}").decode
    assert (decode.max_new_tokens, decode.threshold) == (2048, 1.0)
    decode = eval_cfg(f"benchmark={name}", "benchmark.decode.max_new_tokens=300").decode
    assert decode.max_new_tokens == 300  # the benchmark's own value, changed
    decode = eval_cfg(f"benchmark={name}", "decode.max_new_tokens=16", "decode.threshold=0.9")
    assert (decode.decode.max_new_tokens, decode.decode.threshold) == (16, 0.9)  # the CLI wins


def test_the_demo_benchmark_keeps_a_small_budget() -> None:
    decode = eval_cfg("benchmark=synthetic").decode
    assert (decode.max_new_tokens, decode.threshold) == (128, 0.9)


def test_gsm8k_and_math_prompts_are_the_released_ones(gsm8k_path: str) -> None:
    cue = "Please reason step by step, and put your final answer within \\boxed{}."
    options = dict(eval_cfg("benchmark=gsm8k").benchmark) | {"path": gsm8k_path}
    gsm8k = get(**{k: v for k, v in options.items() if k != "_target_"})
    content = gsm8k.messages(gsm8k.load()[0])[0]["content"]
    assert content == f"Question: {GSM8K_ROWS[0]['question']}\n{cue}"
    options = dict(eval_cfg("benchmark=math").benchmark)
    math = get(**{k: v for k, v in options.items() if k != "_target_"})
    content = math.messages({"problem": "Find $x$ if $x^{2} = 4$."})[0]["content"]
    assert content == f"Problem:\nFind $x$ if $x^{{2}} = 4$.\n\n{cue}"


def test_metrics_record_the_protocol(export_dir: Path, gsm8k_path: str, tmp_path: Path) -> None:
    cfg = eval_cfg(
        f"ckpt={export_dir}",
        "benchmark=gsm8k",
        f"benchmark.path={gsm8k_path}",
        "decode.max_new_tokens=8",
        "decode.sub_block_size=4",
    )
    metrics = evaluate_export(cfg, str(tmp_path))
    assert metrics["decode"]["max_new_tokens"] == 8 and metrics["decode"]["threshold"] == 1.0
    assert metrics["protocol"] == {
        "released": {"max_new_tokens": 2048, "threshold": 1.0},
        "deviations": {"max_new_tokens": 8},
        "follows": False,
        "prompt": cfg.benchmark.prompt,
        "chat_template": True,
        "num_fewshot": 0,
        "stop_token": "<|im_end|>",
    }
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].endswith("\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_a_budget_beyond_the_context_stops_before_decoding(
    export_dir: Path, gsm8k_path: str, tmp_path: Path
) -> None:
    cfg = eval_cfg(f"ckpt={export_dir}", "benchmark=gsm8k", f"benchmark.path={gsm8k_path}")
    with pytest.raises(ValueError, match="max_new_tokens=2048 exceeds the model's context of 512"):
        evaluate_export(cfg, str(tmp_path))
    assert not (tmp_path / "metrics.json").exists()


def test_decode_eval_decodes_each_benchmark_under_its_protocol(export_dir: Path) -> None:
    synthetic = get("synthetic", n=2, decode={"max_new_tokens": 600})
    assert benchmark_decode(DECODE, synthetic, {"threshold": None})["max_new_tokens"] == 600
    assert benchmark_decode(DECODE, synthetic, {"max_new_tokens": 4})["max_new_tokens"] == 4
    with pytest.raises(ValueError, match="benchmark.decode.sub_block_size"):
        get("synthetic", decode={"sub_block_size": 4})

    export = load_export(str(export_dir))
    short = get("synthetic", n=2, decode={"max_new_tokens": 8})
    callback = DecodeEval({"long": synthetic, "short": short}, DECODE, limit=2)
    # 600 new tokens do not fit the tiny model's 512: that benchmark's evaluation fails alone.
    assert callback._evaluate(export, "long", synthetic) == {"decode_eval/long/failed": 1.0}
    assert callback._evaluate(export, "short", short)["decode_eval/short/num_scored"] == 2
