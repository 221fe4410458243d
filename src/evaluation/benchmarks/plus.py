"""HumanEval+ and MBPP+ (EvalPlus), scored as EvalPlus scores them.

EvalPlus's problems (its data file: ``benchmark.path``, else the copy evalplus downloads once into
its cache), its chat prompt (an instruction, then the assistant's turn opened with a ```python
fence that the model continues), its post-processing (the continuation cut at its stop strings,
then ``evalplus.sanitize``) and its tests: the base inputs, then the extra ("plus") inputs, each
output compared with the canonical solution's. Both solutions run in the sandbox, in one program
(``plus_check``: EvalPlus's checker, ported to the standard library); EvalPlus's own executor,
which runs code in a fork of the evaluator, is never called.

``tests=plus`` (default) is EvalPlus's "+" score, base and plus inputs; ``tests=base`` its base
score. Offline (``HF_DATASETS_OFFLINE=1``) nothing is downloaded: set ``benchmark.path`` to
EvalPlus's jsonl (``HumanEvalPlus.jsonl.gz`` / ``MbppPlus.jsonl.gz`` of its release, gunzipped,
or the copy in ``~/.cache/evalplus``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path
from typing import ClassVar

from src.config import ConfigError
from src.evaluation.benchmarks.code import _CodeBenchmark
from src.evaluation.sandbox import ExecResult

# evalplus.codegen.run_codegen's instruction and response prefixes (local names there).
INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a "
    "markdown code block:"
)
RESPONSE = (
    "Below is a Python script with a self-contained function that solves the problem and passes "
    "corresponding tests:"
)
# EvalPlus's modules the check imports: standard library only, so any sandbox Python runs them.
_EVALPLUS_MODULES = (
    "evalplus.config",
    "evalplus.eval.utils",
    "evalplus.eval._special_oracle",
    "evalplus.gen.util",
)
_PACKAGES = ("evalplus", "evalplus.eval", "evalplus.gen")
# evalplus's HF backend keeps at most this many characters of a continuation.
_MAX_CHARS = 10000


class _PlusBenchmark(_CodeBenchmark):
    """An EvalPlus set. ``version``: EvalPlus's dataset release ("default": the one this evalplus
    scores by default); ``tests``: "plus" or "base". Sandbox options as ``_CodeBenchmark``, with
    EvalPlus's limits as defaults (its 4 GiB; each suite may take 60 s)."""

    dataset: ClassVar[str] = ""  # evalplus's name for it
    release: ClassVar[str] = ""  # the release file's stem
    required_fields: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "task_id": str,
        "prompt": str,
        "entry_point": str,
        "canonical_solution": str,
        "base_input": list,
        "plus_input": list,
        "atol": (int, float),
    }

    def __init__(
        self,
        *,
        version: str = "default",
        tests: str = "plus",
        timeout: float = 150.0,
        memory_mb: int = 4096,
        **options: object,
    ) -> None:
        super().__init__(timeout=timeout, memory_mb=memory_mb, **options)
        if tests not in ("plus", "base"):
            raise ConfigError(f"benchmark.tests must be plus or base, got {tests!r}")
        self.version, self.tests = version, tests
        self.data_file: str | None = None

    def execution(self) -> dict[str, object]:
        from evalplus import __version__

        data = self.data_file
        return super().execution() | {
            "tests": "base+plus" if self.tests == "plus" else "base",
            "evalplus": __version__,
            "data": data,
            "data_md5": hashlib.md5(Path(data).read_bytes()).hexdigest() if data else None,
        }

    # --- data ---------------------------------------------------------------------------------

    def _rows(self) -> list[dict]:
        if self.path is not None and str(self.path).endswith(".gz"):
            raise ConfigError(
                f"benchmark.path={self.path} is gzipped: gunzip it and pass the jsonl"
            )
        rows = super()._rows()
        self.data_file = self.path if self.path is not None else self.data_file
        return rows

    def _builtin_rows(self) -> list[dict]:
        self.data_file = self._evalplus_copy()
        return self._jsonl_rows(self.data_file)

    def _evalplus_copy(self) -> str:
        """evalplus's cached copy of the release, downloaded first unless offline."""
        from evalplus.data.utils import get_dataset_metadata, make_cache

        url, cached = get_dataset_metadata(self.release, self._version(), mini=False)
        if os.path.exists(cached):
            return cached
        hint = f"set benchmark.path to a local copy of {url} (gunzipped)"
        if os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise ConfigError(f"{self.name}: no copy of EvalPlus's data (offline); {hint}")
        try:
            make_cache(url, cached)
        except Exception as error:  # urllib raises many types; no network is the usual cause
            raise ConfigError(
                f"{self.name}: cannot download EvalPlus's data ({type(error).__name__}); {hint}"
            ) from None
        return cached

    def _version(self) -> str:
        raise NotImplementedError

    # --- prompt and post-processing -----------------------------------------------------------

    def messages(self, problem: dict) -> list[dict[str, str]]:
        """evalplus.provider.utility.make_raw_chat_prompt's chat: the task, then the assistant's
        turn opened, to be continued (the runner renders a final assistant turn unclosed)."""
        task = f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"
        return [
            {"role": "user", "content": task},
            {"role": "assistant", "content": f"{RESPONSE}\n```python\n"},
        ]

    def solution(self, problem: dict, response: str) -> str:
        """The program EvalPlus would test: the continuation up to its first stop string
        (evalplus's HF backend), tabs as spaces, then ``sanitize`` (imports and the
        definitions the entry point reaches)."""
        from evalplus.provider.utility import EOS
        from evalplus.sanitize import sanitize

        cut = min((response.find(s) for s in [*EOS, "\n```\n"] if s in response), default=None)
        text = response[: cut if cut is not None else _MAX_CHARS].replace("\t", "    ")
        return sanitize(text, entrypoint=problem["entry_point"])

    # --- the check ----------------------------------------------------------------------------

    def program(self, problem: dict, response: str) -> str:
        task = {
            "dataset": self.dataset,
            "entry_point": problem["entry_point"],
            "prompt": problem["prompt"],
            "canonical_solution": problem["canonical_solution"],
            "solution": self.solution(problem, response),
            "atol": problem["atol"],
            "output_not_none": self._output_not_none(problem),
            "suites": ["base", "plus"] if self.tests == "plus" else ["base"],
            "base_input": self._inputs(problem, "base_input"),
            "plus_input": self._inputs(problem, "plus_input"),
        }
        payload = base64.b64encode(pickle.dumps(task, protocol=4)).decode()
        return f"{_harness()}\nimport plus_check\nplus_check.main({payload!r})\n"

    def _inputs(self, problem: dict, key: str) -> list:
        return problem[key]

    def _output_not_none(self, problem: dict) -> bool:
        return False

    def check(self) -> None:
        """The sandbox works (or was opted out of), and evalplus is installed here."""
        super().check()
        try:
            _harness()
        except ImportError as error:
            raise ConfigError(
                f"{self.name}: {error}; install it: pip install --no-deps evalplus==0.3.1 "
                "(as the Makefile does)"
            ) from None

    def passed(self, problem: dict, result: ExecResult) -> bool:
        from src.evaluation.benchmarks.plus_check import GROUND_TRUTH_FAILED

        if result.returncode == GROUND_TRUTH_FAILED:
            raise RuntimeError(
                f"{self.name}: the canonical solution of {problem['task_id']} failed in the "
                f"sandbox: {result.stdout.strip()[-300:]}"
            )
        return result.passed


@functools.cache
def _harness() -> str:
    """The programs' fixed part: EvalPlus's standard-library modules and ``plus_check``, each
    registered in ``sys.modules`` under its name, from the installed source."""
    sources = [
        (name, Path(importlib.util.find_spec(name).origin).read_text())
        for name in _EVALPLUS_MODULES
    ]
    sources.append(("plus_check", Path(__file__).with_name("plus_check.py").read_text()))
    return (
        "import sys, types\n"
        f"for _name in {list(_PACKAGES)!r}:\n"
        "    sys.modules[_name] = types.ModuleType(_name)\n"
        "    sys.modules[_name].__path__ = []\n"
        f"for _name, _source in {sources!r}:\n"
        "    _module = sys.modules[_name] = types.ModuleType(_name)\n"
        "    exec(compile(_source, _name, 'exec'), _module.__dict__)\n"
    )


class HumanEvalPlus(_PlusBenchmark):
    """HumanEval+ (164 problems): HumanEval's with about 80x more test inputs."""

    name = "humaneval_plus"
    dataset = "humaneval"
    release = "HumanEvalPlus"

    def _version(self) -> str:
        from evalplus.data.humaneval import HUMANEVAL_PLUS_VERSION

        return HUMANEVAL_PLUS_VERSION if self.version == "default" else self.version


class MBPPPlus(_PlusBenchmark):
    """MBPP+ (378 problems of MBPP's sanitized set) with about 35x more test inputs."""

    name = "mbpp_plus"
    dataset = "mbpp"
    release = "MbppPlus"

    def _version(self) -> str:
        from evalplus.data.mbpp import MBPP_PLUS_VERSION

        return MBPP_PLUS_VERSION if self.version == "default" else self.version

    def _inputs(self, problem: dict, key: str) -> list:
        # The file keeps tuples, sets and complex numbers as JSON lists and strings.
        from evalplus.data.mbpp import mbpp_deserialize_inputs

        return mbpp_deserialize_inputs(problem["task_id"], problem[key])

    def _output_not_none(self, problem: dict) -> bool:
        from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS

        return problem["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
