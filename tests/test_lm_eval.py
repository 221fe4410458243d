"""The lm-eval model `fast_dllm` (src/lm_eval_adapter.py) on a tiny real export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from src.decoding import generate
from src.evaluation.lm_eval import FastDLLM, cut_at
from tests.fixtures.exports import make_export

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("lm_eval") / "export", block_size=8)


@pytest.fixture(scope="module")
def lm(export_dir) -> FastDLLM:
    return FastDLLM(str(export_dir), threshold=0.9, sub_block_size=4, batch_size=2, device="cpu")


def instance(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_registered_under_fast_dllm():
    assert get_model("fast_dllm") is FastDLLM


def test_cut_at_earliest_stop():
    assert cut_at("ab\ncd.ef", [".", "\n"]) == "ab"
    assert cut_at("abc", "z") == "abc" and cut_at("abc", None) == "abc"


def test_generate_until_is_the_decoder_cut_at_until(lm):
    contexts = ["Compute 1 + 4 + 2\nAnswer:", "Sort 3 1 2", "Reverse a b c\nAnswer:"]
    kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    outputs = lm.generate_until([instance("generate_until", (c, kwargs)) for c in contexts])
    for context, output in zip(contexts, outputs, strict=True):
        alone = generate(
            lm.model,
            [lm.tok_encode(context)],
            mask_token_id=lm.settings["mask_token_id"],
            stop_token_id=lm.eot_token_id,
            block_size=8,
            sub_block_size=4,
            threshold=0.9,
            max_new_tokens=12,
        )
        text = lm.tokenizer.decode(alone.tokens[0], skip_special_tokens=True)
        assert output == text.split("\n")[0]


def test_loglikelihood_is_the_causal_score(lm):
    pairs = [("Compute 1 + 4", " = 5"), ("Sort the digits 3 1 2", " 1 2 3"), ("ab", " c")]
    results = lm.loglikelihood([instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        with torch.no_grad():
            logits = lm.model(torch.tensor([whole])).logits[0].log_softmax(-1)
        cont = whole[len(ctx) :]
        expected = sum(float(logits[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert logprob == pytest.approx(expected, abs=1e-4)
        argmax = [int(logits[len(ctx) - 1 + i].argmax()) for i in range(len(cont))]
        assert greedy == (argmax == cont)


def test_loglikelihood_rolling_sums_token_scores(lm):
    text = "Compute 1 + 4 + 2"
    (total,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(float(logits[i - 1, t]) for i, t in enumerate(ids) if i > 0)
    assert total == pytest.approx(expected, abs=1e-4)


def test_block_size_mismatch_is_rejected(export_dir):
    with pytest.raises(ValueError, match="allow_block_size_mismatch"):
        FastDLLM(str(export_dir), block_size=16, sub_block_size=4)


@pytest.mark.slow
def test_lm_eval_cli_runs_local_tasks(export_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.lm_eval_adapter",
            "--model",
            "fast_dllm",
            "--model_args",
            f"pretrained={export_dir},threshold=0.9,sub_block_size=4",
            "--include_path",
            str(TASKS),
            "--tasks",
            "fast_dllm_synthetic_gen,fast_dllm_synthetic_mc",
            "--output_path",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = tmp_path.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert "exact_match,none" in results["fast_dllm_synthetic_gen"]
    assert "acc,none" in results["fast_dllm_synthetic_mc"]
