"""GSM8K and MATH (MATH-500 style): step-by-step prompts, ``\\boxed{}`` answers.

Both use the released protocol's prompt (SPEC 4.1): lm-eval's prompt of the task (``gsm8k``,
``minerva_math``) with its trailing "Answer:" / "Solution:" cue replaced by "Please reason step
by step, and put your final answer within \\boxed{}."; ``prompt`` (conf/benchmark/<name>.yaml)
is that template, its ``{field}``s filled from the problem. A GSM8K response is correct when
its final number equals the reference's; a MATH response when math-verify finds its final
answer equivalent to the reference.
"""

from __future__ import annotations

import re
import threading
from typing import ClassVar

from src.evaluation.benchmarks.base import Benchmark

STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."
# The templates' braces are str.format's: "{{}}" is a literal "{}".
_CUE = STEP_BY_STEP.replace("{}", "{{}}")
GSM8K_PROMPT = "Question: {question}\n" + _CUE
MATH_PROMPT = "Problem:\n{problem}\n\n" + _CUE
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), nested braces kept; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("box", 1)[1]
    if rest.startswith("ed"):
        rest = rest[2:]
    if not rest.startswith("{"):
        # "\boxed 5": the answer runs to the next space or dollar sign.
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None


def parse_number(text: str) -> float | None:
    """A number written plainly ("1,234", "-3.50", "$5", "12.") as float; None otherwise."""
    cleaned = re.sub(r"\\?\$|\\%|%|\\,|,|\s", "", text).rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_gsm8k_answer(response: str) -> str | None:
    """Final answer of a response: the last ``\\boxed{}``, else "answer is X", else last number."""
    boxed = extract_boxed(response)
    if boxed is not None:
        numbers = re.findall(_NUMBER, boxed)
        return numbers[-1] if parse_number(boxed) is None and numbers else boxed
    stated = re.findall(rf"answer is:?\s*\$?\s*({_NUMBER})", response, flags=re.IGNORECASE)
    if stated:
        return stated[-1]
    numbers = re.findall(_NUMBER, response)
    return numbers[-1] if numbers else None


def numbers_equal(predicted: str | None, reference: str) -> bool:
    """Numeric equality (to 1e-6 relative) when both parse, else exact string equality."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return predicted.strip() == reference.strip()


class GSM8K(Benchmark):
    """Grade-school math; the reference is the number after ``####`` in the answer field."""

    name = "gsm8k"
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {"question": str, "answer": str}

    def check_record(self, record: dict) -> None:
        """A ``question``, and an ``answer`` ending in ``#### <number>``."""
        super().check_record(record)
        if "####" not in record["answer"]:
            raise ValueError("answer: no '#### <number>' final answer")

    def __init__(self, *, prompt: str = GSM8K_PROMPT, **options: object) -> None:
        super().__init__(**options)
        self.prompt = prompt

    def messages(self, problem: dict) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt.format(**problem)}]

    def score(self, problem: dict, response: str) -> bool:
        return numbers_equal(extract_gsm8k_answer(response), gsm8k_reference(problem["answer"]))


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K answer ("... #### 1,234" -> "1234")."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}; check benchmark.path")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def math_equal(response: str, reference: str) -> bool:
    """Whether the final answer of ``response`` (its last ``\\boxed{}``, else its last stated
    answer) equals the LaTeX ``reference``, by math-verify: numeric, symbolic, set and interval
    equality, with units and ``\\text{}`` dropped (as lm-eval's ``minerva_math`` uses it).

    math-verify bounds parsing and comparing with ``signal.alarm``, which only the main thread
    may set; elsewhere it would quietly answer False, so this raises instead."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("math-verify's timeouts need the main thread; score MATH there")
    from math_verify import parse, verify

    return verify(parse(f"${reference}$"), parse(response))


class MATH(Benchmark):
    """Competition math (MATH-500 fields: problem, answer or a solution with ``\\boxed{}``)."""

    name = "math"
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {"problem": str}

    def check_record(self, record: dict) -> None:
        """A ``problem``, and a reference: an ``answer``, or a ``solution`` with a ``\\boxed{}``."""
        super().check_record(record)
        if isinstance(record.get("answer"), str) and record["answer"].strip():
            return
        solution = record.get("solution")
        if not isinstance(solution, str) or extract_boxed(solution) is None:
            raise ValueError("answer: missing, and no solution with a \\boxed{} answer")

    def __init__(self, *, prompt: str = MATH_PROMPT, **options: object) -> None:
        super().__init__(**options)
        self.prompt = prompt

    def messages(self, problem: dict) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt.format(**problem)}]

    def score(self, problem: dict, response: str) -> bool:
        reference = problem.get("answer") or extract_boxed(problem.get("solution", ""))
        if reference is None:
            raise ValueError(
                "MATH problem without 'answer' or boxed 'solution'; check benchmark.path"
            )
        return math_equal(response, reference)
