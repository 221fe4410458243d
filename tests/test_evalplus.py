"""HumanEval+ and MBPP+ (src/evaluation/benchmarks/plus.py) on local fixtures in EvalPlus's
format: EvalPlus's prompt, post-processing and base + plus tests, every program in the sandbox."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from src.config import ConfigError
from src.data.tokenizer import synthetic_tokenizer
from src.evaluation.benchmarks import get
from src.evaluation.benchmarks.plus import INSTRUCTION, RESPONSE
from src.evaluation.run import evaluate_export
from src.evaluation.runner import render_prompts, score_safely
from tests.fixtures.exports import make_export

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "evalplus"
DATA = {
    "humaneval_plus": FIXTURES / "HumanEvalPlus.jsonl",
    "mbpp_plus": FIXTURES / "MbppPlus.jsonl",
}


def bench(name: str, **options: object):
    return get(name, path=str(DATA[name]), workers=2, **options)


def canonical(problem: dict, name: str) -> str:
    """The canonical solution as a model's continuation of EvalPlus's "```python" turn."""
    code = problem["canonical_solution"]
    if name == "humaneval_plus":  # HumanEval's canonical solution is a body: the prompt first
        code = problem["prompt"] + code
    return f"{code}```\n\nThis solves the task."


@pytest.mark.parametrize("name", list(DATA))
def test_fixture_is_evalplus_data(name: str) -> None:
    from evalplus.data.utils import completeness_check, stream_jsonl

    benchmark = bench(name)
    problems = benchmark.load()
    assert problems == list(stream_jsonl(str(DATA[name])))  # evalplus's own reader
    completeness_check(name, {p["task_id"]: p for p in problems})
    for problem in problems:
        benchmark.check_record(problem)
    broken = {k: v for k, v in problems[0].items() if k != "plus_input"}
    with pytest.raises(ValueError, match=r"^plus_input: missing"):
        benchmark.check_record(broken)
    with pytest.raises(ValueError, match=r"^atol: str, not int or float$"):
        benchmark.check_record(problems[0] | {"atol": "0"})


@pytest.mark.parametrize("name", list(DATA))
def test_canonical_solutions_pass_and_stubs_fail(name: str) -> None:
    benchmark = bench(name)
    problems = benchmark.load()
    assert benchmark.score_many(problems, [canonical(p, name) for p in problems]) == [True] * len(
        problems
    )
    stubs = [f"def {p['entry_point']}(*args):\n    return None\n```" for p in problems]
    assert benchmark.score_many(problems, stubs) == [False] * len(problems)


# Right on the base inputs, wrong on an extra one: [] / runs of spaces / 1.
BASE_ONLY = {
    "humaneval_plus": {
        "HumanEval/0": "def sum_list(numbers):\n    return numbers[0] + sum(numbers[1:])\n```",
        "HumanEval/2": 'def reverse_words(s):\n    return " ".join(reversed(s.split(" ")))\n```',
    },
    "mbpp_plus": {
        "Mbpp/3": "def is_not_prime(n):\n    return any(n % i == 0 for i in range(2, n))\n```",
    },
}


@pytest.mark.parametrize("name", list(DATA))
def test_plus_inputs_fail_what_the_base_inputs_pass(name: str) -> None:
    problems = {p["task_id"]: p for p in bench(name).load()}
    chosen = [problems[task] for task in BASE_ONLY[name]]
    responses = list(BASE_ONLY[name].values())
    assert bench(name, tests="base").score_many(chosen, responses) == [True] * len(chosen)
    assert bench(name, tests="plus").score_many(chosen, responses) == [False] * len(chosen)


def test_evalplus_comparison_rules() -> None:
    he = {p["entry_point"]: p for p in bench("humaneval_plus").load()}
    mbpp = {p["entry_point"]: p for p in bench("mbpp_plus").load()}
    cases = [
        # floats: within EvalPlus's enforced atol 1e-6 (fsum differs from sum in the last bits)
        (he["mean"], "import math\ndef mean(xs):\n    return math.fsum(xs) / len(xs)\n```", True),
        (he["mean"], "def mean(xs):\n    return sum(xs) / len(xs) + 1e-3\n```", False),
        (he["sum_list"], "def sum_list(numbers):\n    return float(sum(numbers))\n```", True),
        # an endless loop: stopped by the per-input time limit
        (he["sum_list"], "def sum_list(numbers):\n    while True:\n        pass\n```", False),
        # Mbpp/2 compares as sets; its inputs are tuples again (the file keeps JSON lists)
        (
            mbpp["similar_elements"],
            "def similar_elements(a, b):\n    assert isinstance(a, tuple)\n"
            "    return sorted(set(a) & set(b), reverse=True)\n```",
            True,
        ),
    ]
    for problem, response, expected in cases:
        benchmark = bench("humaneval_plus" if problem in he.values() else "mbpp_plus")
        assert benchmark.score(problem, response) == expected, response


def test_post_processing_is_evalplus() -> None:
    benchmark = bench("humaneval_plus")
    problem = benchmark.load()[0]
    response = (
        "import math\n\ndef helper(x):\n\treturn x\n\ndef sum_list(numbers):\n"
        "\treturn sum(helper(n) for n in numbers)\n\nprint(sum_list([1, 2]))\n"
        'if __name__ == "__main__":\n    sum_list(input())\n```\n\nThe loop adds them up.'
    )
    # Cut at EvalPlus's stop string "\nprint(", tabs made spaces, then sanitize.
    assert benchmark.solution(problem, response) == (
        "import math\ndef helper(x):\n    return x\ndef sum_list(numbers):\n"
        "    return sum(helper(n) for n in numbers)"
    )
    assert benchmark.score(problem, response)
    # A bare body is not a self-contained solution: EvalPlus fails it.
    assert not benchmark.score(problem, problem["canonical_solution"] + "```")


def test_prompt_is_evalplus_chat_prompt(tmp_path: Path) -> None:
    from evalplus.provider.utility import make_raw_chat_prompt

    source = Path(importlib.util.find_spec("evalplus.codegen").origin).read_text()
    assert f'"{INSTRUCTION}"' in source and f'"{RESPONSE}"' in source
    tokenizer = synthetic_tokenizer(tmp_path / "tokenizer")
    for name in DATA:
        benchmark = bench(name)
        problems = benchmark.load()
        expected = [
            make_raw_chat_prompt(p["prompt"].strip() + "\n", INSTRUCTION, RESPONSE, tokenizer)
            for p in problems
        ]
        assert render_prompts(tokenizer, benchmark, problems) == expected
        assert expected[0].endswith("tests:\n```python\n")


def test_data_without_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import evalplus.data.utils

    # evalplus's cache, made empty: offline, nothing may be downloaded.
    monkeypatch.setattr(evalplus.data.utils, "CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        get("humaneval_plus").load()
    message = str(error.value)
    assert "\n" not in message and message.startswith("humaneval_plus: no copy of EvalPlus's")
    assert "set benchmark.path to a local copy of https://" in message
    with pytest.raises(ConfigError, match="gunzip it"):
        get("mbpp_plus", path=str(tmp_path / "MbppPlus.jsonl.gz")).load()
    # A copy in evalplus's cache is used as it is, and recorded.
    cached = tmp_path / "MbppPlus-v0.2.0.jsonl"
    cached.write_bytes(DATA["mbpp_plus"].read_bytes())
    benchmark = get("mbpp_plus")
    assert [p["task_id"] for p in benchmark.load()] == ["Mbpp/2", "Mbpp/3"]
    assert benchmark.execution()["data"] == str(cached)


def test_a_failing_canonical_solution_is_a_scorer_error() -> None:
    benchmark = bench("humaneval_plus")
    problem = benchmark.load()[0] | {"canonical_solution": "    return undefined_name\n"}
    response = canonical(benchmark.load()[0], "humaneval_plus")
    with pytest.raises(RuntimeError, match="canonical solution of HumanEval/0 failed"):
        benchmark.score(problem, response)
    assert score_safely(benchmark, [problem], [response]) == ([False], 1)


def test_eval_runs_humaneval_plus(tmp_path: Path) -> None:
    export = make_export(tmp_path / "export", block_size=8)
    overrides = [
        f"ckpt={export}",
        "benchmark=humaneval_plus",
        f"benchmark.path={DATA['humaneval_plus']}",
        "limit=2",
        "batch_size=2",
        "decode.max_new_tokens=8",
        "decode.sub_block_size=4",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides)
    metrics = evaluate_export(cfg, str(tmp_path / "run"))
    assert metrics["metric"] == "pass@1" and metrics["num_scored"] == 2
    assert metrics["score_errors"] == 0
    execution = metrics["code_execution"]
    assert execution["sandbox"] == "bubblewrap" and execution["tests"] == "base+plus"
    assert execution["evalplus"] == "0.3.1" and len(execution["data_md5"]) == 32
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    assert all(s["prompt"].endswith("```python\n") for s in samples)
