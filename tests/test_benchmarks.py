"""Benchmarks: loading (local jsonl, bundled HumanEval, synthetic), prompts, extraction, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra.utils import instantiate

from src.evaluation.benchmarks import NAMES, get
from src.evaluation.benchmarks.code import extract_code
from src.evaluation.benchmarks.reasoning import (
    extract_boxed,
    extract_gsm8k_answer,
    gsm8k_reference,
    math_equal,
    normalize_math,
)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A car costs $1,234. Price?", "answer": "It is 1,234.\n#### 1,234"},
    {"question": "Temperature drops 5 from 1?", "answer": "1 - 5 = -4\n#### -4"},
]
MATH_ROWS = [
    {
        "problem": "Half of one?",
        "solution": "It is $\\boxed{\\frac{1}{2}}$.",
        "answer": "\\frac{1}{2}",
    },
    {
        "problem": "Polar form of (0,3)?",
        "solution": "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
    },
]
MBPP_ROWS = [
    {
        "task_id": 2,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "test_setup_code": "",
    }
]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("So the total is \\boxed{42}.", "42"),
        ("The answer is 1,234.", "1,234"),
        ("It falls by 4, so the answer is -4.", "-4"),
        ("Each costs 2.5 dollars, in all 7.5", "7.5"),
        ("\\boxed{\\$18.00}", "\\$18.00"),
        ("\\boxed{18 \\text{ apples}}", "18"),
    ],
)
def test_gsm8k_extraction(response: str, expected: str) -> None:
    assert extract_gsm8k_answer(response) == expected


def test_gsm8k_reference_and_scoring(tmp_path: Path) -> None:
    bench = get("gsm8k", path=_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    problems = bench.load()
    assert [gsm8k_reference(p["answer"]) for p in problems] == ["7", "1234", "-4"]
    assert bench.score(problems[0], "3 + 4 = 7. \\boxed{7}")
    assert bench.score(problems[1], "The answer is 1,234.")
    assert bench.score(problems[1], "\\boxed{\\$1,234.00}")
    assert bench.score(problems[2], "\\boxed{-4}")
    assert not bench.score(problems[2], "\\boxed{4}")
    assert not bench.score(problems[0], "I do not know.")
    content = bench.messages(problems[0])[0]["content"]
    assert content.startswith("Tom has") and "\\boxed{}" in content


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed 5$", "5"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("90^\\circ", "90"),
        ("\\text{(B)}", "(B)"),
        ("2.0", "2"),
        (".5", "0.5"),
    ],
)
def test_math_normalisation_equates(predicted: str, reference: str) -> None:
    assert math_equal(predicted, reference)


def test_math_normalisation_keeps_differences() -> None:
    assert not math_equal("\\frac{1}{3}", "\\frac{1}{2}")
    assert not math_equal("(3,\\pi)", "(3,\\frac{\\pi}{2})")
    assert not math_equal(None, "1")
    assert normalize_math("\\sqrt2 + 1") == "\\sqrt{2}+1"


def test_math_scoring(tmp_path: Path) -> None:
    bench = get("math", path=_jsonl(tmp_path / "math.jsonl", MATH_ROWS))
    first, second = bench.load()
    assert bench.score(first, "Thus $\\boxed{\\dfrac{1}{2}}$.")
    assert not bench.score(first, "Thus $\\boxed{\\dfrac{1}{3}}$.")
    # Without an "answer" field, the reference comes from the solution's box.
    assert bench.score(second, "\\boxed{(3, \\frac{\\pi}{2})}")


def test_extract_code() -> None:
    fenced = "Here:\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(fenced) == "def f(x):\n    return x\n"
    two = "```python\nimport math\n```\nthen\n```python\ndef g():\n    return 1\n```"
    assert extract_code(two, "g") == "def g():\n    return 1\n"
    assert extract_code(two) == "import math\n"
    assert extract_code("```\ndef f(): pass\n```") == "def f(): pass\n"
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"


def test_humaneval_bundled_data_and_canonical_solutions() -> None:
    bench = get("humaneval")
    problems = bench.load()
    assert len(problems) == 164
    assert set(problems[0]) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    few = bench.load(limit=4)
    assert [p["task_id"] for p in few] == [f"HumanEval/{i}" for i in range(4)]
    bodies = [p["canonical_solution"] for p in few]
    full = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in few]
    assert bench.score_many(few, bodies, workers=2) == [True] * 4
    assert bench.score_many(few, full, workers=2) == [True] * 4
    assert "```python" in bench.messages(few[0])[0]["content"]


def test_humaneval_wrong_and_dedented_solutions() -> None:
    bench = get("humaneval", limit=1)
    (problem,) = bench.load()
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert not bench.score(problem, wrong)
    assert not bench.score(problem, "this is not code")
    dedented = "\n".join(
        line.strip() and line[4:] for line in problem["canonical_solution"].split("\n")
    )
    assert bench.score(problem, dedented)


def test_mbpp_scoring(tmp_path: Path) -> None:
    bench = get("mbpp", path=_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS), timeout=10.0)
    (problem,) = bench.load()
    assert "assert add(1, 2) == 3" in bench.messages(problem)[0]["content"]
    assert bench.score(problem, f"```python\n{problem['code']}\n```")
    assert not bench.score(problem, "```python\ndef add(a, b):\n    return a - b\n```")


def test_synthetic_benchmark() -> None:
    bench = get("synthetic", n=8, seed=0)
    problems = bench.load(limit=4)
    assert len(problems) == 4
    assert [m["role"] for m in bench.messages(problems[0])] == ["user"]
    assert bench.score(problems[0], "  " + problems[0]["answer"] + "\n")
    assert not bench.score(problems[0], problems[1]["answer"])


def test_bad_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; use one of gsm8k"):
        get("nope")
    with pytest.raises(ValueError, match="set benchmark.path"):
        get("gsm8k", path=str(tmp_path / "missing.jsonl")).load()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        get("humaneval").load(limit=0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        get("gsm8k", limit=-1)
    with pytest.raises(ValueError, match="set benchmark.path"):
        get("gsm8k", hub_name="no-such-org/no-such-dataset").load()


@pytest.mark.parametrize("name", NAMES)
def test_hydra_configs_instantiate(name: str) -> None:
    with initialize(config_path="../conf", version_base=None):
        cfg = compose(config_name=f"benchmark/{name}")
    assert instantiate(cfg.benchmark).name == name


@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass() -> None:
    bench = get("humaneval", workers=4)
    problems = bench.load()
    responses = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    assert bench.score_many(problems, responses) == [True] * len(problems)
