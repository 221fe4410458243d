"""Benchmarks: loading (local jsonl, bundled HumanEval, synthetic), prompts, extraction, scoring;
code benchmarks refuse to start without a working sandbox unless opted in, and say which ran."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.config import ConfigError
from src.evaluation.benchmarks import NAMES, get
from src.evaluation.benchmarks.code import extract_code
from src.evaluation.benchmarks.reasoning import (
    extract_boxed,
    extract_gsm8k_answer,
    gsm8k_reference,
    math_equal,
)
from src.evaluation.run import evaluate_export
from src.evaluation.sandbox import BWRAP_ENV, bwrap_available
from tests.fixtures.exports import DECODE, make_export

ROOT = Path(__file__).resolve().parents[1]


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
    assert content.startswith("Question: Tom has") and content.endswith("\\boxed{}.")


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


# (reference, the boxed answer of a response, equivalent?). The hand-written normaliser that
# math-verify replaced got 12 of these rows wrong: every equivalent pair but dfrac12, [2, 5),
# 90^circ and x=3, and it equated 1,2 with 12.
MATH_PAIRS = [
    # fractions
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{1}{2}", "2/4", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{1}{3}", "0.33", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    # intervals
    ("[2,5)", "[2, 5)", True),
    ("(-\\infty,-2)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,-2)", True),
    ("[2,5)", "(2,5)", False),
    # units and \text{}
    ("10", "10\\text{ cm}", True),
    ("5\\text{ inches}", "5", True),
    ("90^\\circ", "90", True),
    ("\\text{(B)}", "B", True),
    ("\\text{Monday}", "\\text{Tuesday}", False),
    # multiple answers
    ("1, 2", "2, 1", True),
    ("-2, 3", "3, -2", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("-2, 3", "-2", False),
    ("1,2", "12", False),
    # other forms
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("x=3", "3", True),
    ("\\pi", "3.14", False),
]


@pytest.mark.parametrize(("reference", "boxed", "equivalent"), MATH_PAIRS)
def test_math_equivalence(reference: str, boxed: str, equivalent: bool) -> None:
    assert math_equal(f"So the answer is $\\boxed{{{boxed}}}$.", reference) == equivalent


def test_math_equivalence_refuses_other_threads() -> None:
    # Off the main thread math-verify cannot time out and would answer False: an error instead.
    errors: list[BaseException] = []

    def score() -> None:
        try:
            math_equal("\\boxed{1}", "1")
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_math_scoring(tmp_path: Path) -> None:
    bench = get("math", path=_jsonl(tmp_path / "math.jsonl", MATH_ROWS))
    first, second = bench.load()
    assert bench.score(first, "Thus $\\boxed{\\dfrac{1}{2}}$.")
    assert not bench.score(first, "Thus $\\boxed{\\dfrac{1}{3}}$.")
    # Without an "answer" field, the reference comes from the solution's box.
    assert bench.score(second, "\\boxed{(3, \\frac{\\pi}{2})}")
    for row in MATH_ROWS:
        bench.check_record(row)
    with pytest.raises(ValueError, match=r"^answer: missing, and no solution"):
        bench.check_record({"problem": "?", "solution": "no box"})
    with pytest.raises(ValueError, match=r"^problem: "):
        bench.check_record({"answer": "1"})


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


# --- code benchmarks need a working sandbox (or the loudly named opt-in) ---------------------


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bubblewrap hidden through the sandbox's own setting (a missing executable)."""
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("code") / "export", block_size=8)


def _eval_cfg(ckpt: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", [f"ckpt={ckpt}", *overrides])


CODE_RUN = ["limit=1", "batch_size=1", "decode.max_new_tokens=8", "decode.sub_block_size=4"]


@pytest.mark.parametrize("name", ["humaneval", "mbpp", "humaneval_plus", "mbpp_plus"])
def test_code_benchmarks_refuse_to_start_without_bwrap(no_bwrap: None, name: str) -> None:
    bench = get(name)
    with pytest.raises(ConfigError) as error:
        bench.check()
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{name}: refusing to run model-written code")
    assert "apt-get install bubblewrap" in message and "install_system_deps.sh" in message
    assert "benchmark.allow_unconfined=true" in message
    get(name, allow_unconfined=True).check()  # the opt-in: starts (with a loud warning)


def test_code_benchmarks_report_their_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    if not bwrap_available():
        pytest.skip("bwrap unavailable here (scripts/install_system_deps.sh)")
    assert get("humaneval").execution() == {"sandbox": "bubblewrap", "allow_unconfined": False}
    # Opted in but bwrap works: programs still run under it.
    opted = get("mbpp", allow_unconfined=True).execution()
    assert opted == {"sandbox": "bubblewrap", "allow_unconfined": True}
    monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
    unconfined = get("humaneval", allow_unconfined=True).execution()
    assert unconfined == {"sandbox": "UNCONFINED (allow_unconfined=true)", "allow_unconfined": True}
    synthetic = get("synthetic")
    assert synthetic.check() is None and synthetic.execution() is None  # runs no code


def test_allow_unconfined_is_a_config_bool() -> None:
    with pytest.raises(ConfigError, match="allow_unconfined must be true or false"):
        get("humaneval", allow_unconfined="false")
    with initialize(config_path="../conf", version_base=None):
        default = compose(config_name="benchmark/humaneval")
        opted = compose(config_name="benchmark/mbpp", overrides=["benchmark.allow_unconfined=true"])
    assert instantiate(default.benchmark).allow_unconfined is False
    assert instantiate(opted.benchmark).allow_unconfined is True


def test_eval_refuses_before_the_model_loads(
    no_bwrap: None, export_dir: Path, tmp_path: Path
) -> None:
    # Only diffusion.json: enough for the config checks, not for loading a model, so an error
    # about bubblewrap proves the sandbox was checked before the model loads.
    ckpt = tmp_path / "settings-only"
    ckpt.mkdir()
    shutil.copy(export_dir / "diffusion.json", ckpt / "diffusion.json")
    with pytest.raises(ConfigError, match="apt-get install bubblewrap") as error:
        evaluate_export(_eval_cfg(ckpt, "benchmark=humaneval", *CODE_RUN), str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("confined", [True, False], ids=["bwrap", "unconfined"])
def test_eval_records_the_sandbox_in_metrics(
    confined: bool, export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["benchmark=humaneval", *CODE_RUN]
    if confined and not bwrap_available():
        pytest.skip("bwrap unavailable here (scripts/install_system_deps.sh)")
    if not confined:
        monkeypatch.setenv(BWRAP_ENV, "/nonexistent/bwrap")
        overrides.append("benchmark.allow_unconfined=true")
    evaluate_export(_eval_cfg(export_dir, *overrides), str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    expected = "bubblewrap" if confined else "UNCONFINED (allow_unconfined=true)"
    assert metrics["code_execution"] == {"sandbox": expected, "allow_unconfined": not confined}
    assert metrics["num_scored"] == 1


def test_decode_eval_refuses_code_benchmarks_without_bwrap(no_bwrap: None) -> None:
    from src.training.decode_eval import DecodeEval

    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        DecodeEval({"he": get("humaneval"), "synthetic": get("synthetic")}, DECODE)
    DecodeEval({"synthetic": get("synthetic")}, DECODE)  # no code to run: nothing to refuse
