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

from src.decoding import DecodeSettings, generate
from src.evaluation.benchmarks.reasoning import STEP_BY_STEP
from src.evaluation.ifeval import use_packaged_punkt
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


def instance(kind: str, args: tuple, idx: int = 0, task: str | None = None) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=(task, idx, 1))


def decode_alone(lm: FastDLLM, context: str, max_new_tokens: int) -> str:
    """What the decoder makes of `context` by itself (the adapter's reference)."""
    alone = generate(
        lm.model,
        [lm.tok_encode(context)],
        mask_token_id=lm.settings["mask_token_id"],
        stop_token_id=lm.eot_token_id,
        block_size=8,
        sub_block_size=4,
        threshold=0.9,
        max_new_tokens=max_new_tokens,
    )
    return lm.tokenizer.decode(alone.tokens[0], skip_special_tokens=True)


def test_registered_under_fast_dllm():
    assert get_model("fast_dllm") is FastDLLM


def test_cut_at_earliest_stop():
    assert cut_at("ab\ncd.ef", [".", "\n"]) == "ab"
    assert cut_at("abc", "z") == "abc" and cut_at("abc", None) == "abc"


def test_generate_until_is_the_decoder_to_the_stop_token(export_dir, lm):
    # The released protocol ends a continuation at the stop token only; stop_strings=true also
    # cuts at the task's `until` strings (a string each decode contains, to be sure to cut).
    cutting = FastDLLM(str(export_dir), threshold=0.9, sub_block_size=4, stop_strings=True)
    contexts = ["Compute 1 + 4 + 2\nAnswer:", "Sort 3 1 2", "Reverse a b c\nAnswer:"]
    for context in contexts:
        text = decode_alone(lm, context, 12)
        assert len(text) > 2
        kwargs = {"until": [text[2:4]], "max_gen_toks": 12, "do_sample": False}
        (whole,) = lm.generate_until([instance("generate_until", (context, kwargs))])
        (cut,) = cutting.generate_until([instance("generate_until", (context, kwargs))])
        assert whole == text and cut == text[: text.index(text[2:4])]
    assert lm.get_model_info()["stop_strings"] is False
    assert cutting.get_model_info()["stop_strings"] is True


def test_a_max_new_tokens_model_argument_holds_for_every_task(export_dir, lm):
    fixed = FastDLLM(str(export_dir), threshold=0.9, sub_block_size=4, max_new_tokens=4)
    context, kwargs = "Sort 3 1 2", {"until": [], "max_gen_toks": 12, "do_sample": False}
    assert decode_alone(lm, context, 4) != decode_alone(lm, context, 12)
    (own,) = fixed.generate_until([instance("generate_until", (context, kwargs))])
    (task,) = lm.generate_until([instance("generate_until", (context, kwargs))])
    assert own == decode_alone(lm, context, 4) and task == decode_alone(lm, context, 12)
    assert fixed.get_model_info()["max_new_tokens_from"] == "model_args"
    assert fixed.get_model_info()["decode"]["max_new_tokens"] == 4
    assert lm.get_model_info()["max_new_tokens_from"] == "task max_gen_toks"


def test_gsm8k_and_math_cues_become_the_step_by_step_instruction(export_dir, lm):
    plain = FastDLLM(str(export_dir), threshold=0.9, sub_block_size=4, reasoning_cue=False)
    kwargs = {"until": [], "max_gen_toks": 12, "do_sample": False}
    cases = [
        ("gsm8k", "Question: Tom has 3 apples.\nAnswer:", "Question: Tom has 3 apples.\n"),
        ("minerva_math_algebra", "Problem: 1 + 1?\nSolution:", "Problem: 1 + 1?\n"),
    ]
    for task, context, question in cases:
        request = instance("generate_until", (context, kwargs), task=task)
        (released,) = lm.generate_until([request])
        (kept,) = plain.generate_until([request])
        assert released == decode_alone(lm, question + STEP_BY_STEP, 12)
        assert kept == decode_alone(lm, context, 12) != released
        # Other tasks keep their prompt.
        (other,) = lm.generate_until([instance("generate_until", (context, kwargs), task="x")])
        assert other == kept
    with pytest.raises(ValueError, match="reasoning_cue='yes' must be true or false"):
        FastDLLM(str(export_dir), reasoning_cue="yes")


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


def test_ifeval_scores_offline():
    """lm-eval's own IFEval checks on written responses, offline: sentences counted by NLTK's
    punkt_tab (from the packaged copy), languages told apart by langdetect."""
    folder = use_packaged_punkt()
    assert folder is not None and Path(folder, "english").is_dir()
    from lm_eval.tasks.ifeval.utils import process_results

    docs = [json.loads(line) for line in (TASKS / "ifeval_train.jsonl").read_text().splitlines()]
    cases = [
        # fewer than 3 sentences (Dr. is no sentence end), no commas
        (
            docs[0],
            "A sorted list has its items in order. Dr. Smith says each follows the last.",
            [True, True],
        ),
        (docs[0], "Items rise. They never fall. Ever.", [False, True]),
        (docs[0], "Sorted, in order.", [True, False]),
        # English, all lowercase
        (
            docs[1],
            "a digit is one of the ten symbols that write the numbers from zero to nine.",
            [True, True],
        ),
        (
            docs[1],
            "un chiffre est un des dix symboles qui écrivent les nombres de zéro à neuf.",
            [False, False],  # IFEval's lowercase check asks for English too
        ),
    ]
    for doc, response, followed in cases:
        result = process_results(doc, [response])
        assert result["inst_level_strict_acc"] == followed, response
        assert result["prompt_level_strict_acc"] == all(followed)


@pytest.mark.slow
def test_lm_eval_cli_released_protocol(export_dir, tmp_path):
    """The released script's flags on local tasks: MMLU-style (log-likelihood, 2-shot as
    multi-turn chat), GSM8K-style and IFEval-style (generated, scored by lm-eval's own code)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tasks = [
        "mmlu_fast_dllm_fixture",
        "gsm8k_fast_dllm_fixture",
        "ifeval_fast_dllm_fixture",
        "fast_dllm_synthetic_gen",
        "fast_dllm_synthetic_mc",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.lm_eval_adapter",
            "--model",
            "fast_dllm",
            "--model_args",
            f"pretrained={export_dir},threshold=0.9,sub_block_size=4,max_new_tokens=8",
            "--include_path",
            str(TASKS),
            "--tasks",
            ",".join(tasks),
            "--apply_chat_template",
            "--fewshot_as_multiturn",
            "--log_samples",
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
    output = json.loads(results_file.read_text())
    results = output["results"]
    assert "acc,none" in results["mmlu_fast_dllm_fixture"]
    assert output["n-shot"]["mmlu_fast_dllm_fixture"] == 2
    gsm8k = results["gsm8k_fast_dllm_fixture"]
    assert "exact_match,strict-match" in gsm8k and "exact_match,flexible-extract" in gsm8k
    assert "prompt_level_strict_acc,none" in results["ifeval_fast_dllm_fixture"]
    assert "exact_match,none" in results["fast_dllm_synthetic_gen"]
    assert "acc,none" in results["fast_dllm_synthetic_mc"]
    # The decode settings, beside lm-eval's own record of the run.
    config = output["config"]
    assert config["decoder"] == "diffusion" and config["max_new_tokens_from"] == "model_args"
    assert config["decode"] == DecodeSettings.defaults() | {
        "block_size": 8,
        "threshold": 0.9,
        "sub_block_size": 4,
        "max_new_tokens": 8,
        "allow_block_size_mismatch": False,
    }
    assert config["stop_strings"] is False and config["reasoning_cue"] is True
    assert output["fewshot_as_multiturn"] is True and "<|im_start|>" in output["chat_template"]
    # Few-shot examples as turns: two answered user turns, then the question.
    (samples_file,) = tmp_path.glob("*/samples_mmlu_fast_dllm_fixture_*.jsonl")
    sample = json.loads(samples_file.read_text().splitlines()[0])
    context = sample["arguments"]["gen_args_0"]["arg_0"]
    assert context.count("<|im_start|>user") == 3
    assert "<|im_start|>assistant\nC<|im_end|>" in context
    assert context.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
