"""EvalPlus's check of one solution: runs inside the sandbox, never in the evaluator.

A port of ``evalplus.eval.untrusted_check`` and ``unsafe_execute`` (evalplus 0.3.1) that needs
only the standard library: the sandbox's Python may be the system's, without numpy or evalplus
(it is where the evaluator's interpreter is not executable by the sandbox uid). The program
``src.evaluation.benchmarks.plus`` builds first puts EvalPlus's own standard-library modules
(``evalplus.config``, ``evalplus.eval.utils``, ``evalplus.eval._special_oracle``,
``evalplus.gen.util``) into ``sys.modules`` from their installed source, then this module, then
calls ``main`` with the task. EvalPlus's rules are kept line for line, its quirks included (see
``find_zero`` below); what differs:

- numpy's ``allclose`` and ``is_floats`` are written out for Python numbers (``_allclose``);
- the memory limit is the sandbox's (``benchmark.memory_mb``), not EvalPlus's own 4 GiB
  ``setrlimit``, which could only fail under a lower hard limit.

The expected outputs come from the canonical solution, run here too (``trusted_exec``), with
its times setting each input's limit (max(1 s, 4 x the canonical's time)). The exit status is 0
when every suite passed, 1 when one failed, 3 when the canonical solution itself failed (a
broken data file or sandbox, not the model's fault); stdout has the statuses as JSON.
"""

from __future__ import annotations

import base64
import json
import math
import multiprocessing
import pickle
import sys
import time
from typing import Any

from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT
from evalplus.eval._special_oracle import (
    MBPP_OUTPUT_NOT_NONE_TASKS,
    MBPP_OUTPUT_SET_EQ_TASKS,
    _digit_distance_nums,
    _poly,
    _surface_Area,
)
from evalplus.eval.utils import create_tempdir, reliability_guard, swallow_io, time_limit
from evalplus.gen.util import trusted_exec

PASS, FAIL, TIMEOUT = "pass", "fail", "timeout"
_SUCCESS, _FAILED, _UNKNOWN = 0, 1, 3
_MAPPING = {_SUCCESS: PASS, _FAILED: FAIL, _UNKNOWN: None}
_TIMEOUT_PER_TASK = 60  # evalplus: $EVALPLUS_TIMEOUT_PER_TASK, 60 by default
GROUND_TRUTH_FAILED = 3


def is_floats(x: Any) -> bool:
    """evalplus.eval.is_floats without its numpy-array case (no numpy here)."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _allclose(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """``numpy.allclose(a, b, rtol, atol)`` for numbers and equally long (nested) sequences:
    |a - b| <= atol + rtol |b| everywhere, NaN never close, infinities only to themselves."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return False
        return all(_allclose(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) or isinstance(b, str):
        raise TypeError("allclose of strings")  # numpy refuses them too
    if isinstance(a, complex) or isinstance(b, complex):
        if any(math.isinf(abs(v)) for v in (a, b)):
            return a == b
    elif math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(b)


def unsafe_execute(
    dataset: str,
    entry_point: str,
    code: str,
    inputs: list,
    expected: list,
    time_limits: list[float],
    atol: float,
    fast_check: bool,
    stat: Any,
    details: Any,
    progress: Any,
) -> None:
    """evalplus.eval.unsafe_execute (run in a forked child), numpy-free."""
    with create_tempdir():
        import os
        import shutil

        rmtree = shutil.rmtree
        rmdir = os.rmdir
        chdir = os.chdir
        reliability_guard(maximum_memory_bytes=None)
        exec_globals: dict = {}
        try:
            with swallow_io():
                exec(code, exec_globals)
                fn = exec_globals[entry_point]

            for i, inp in enumerate(inputs):
                try:
                    with time_limit(time_limits[i]):
                        with swallow_io():
                            out = fn(*inp)

                    exp = expected[i]
                    exact_match = out == exp

                    # EvalPlus's special oracles, as evalplus.eval has them.
                    if dataset == "mbpp":
                        if "are_equivalent" == entry_point:  # Mbpp/164
                            exact_match = exact_match or True
                        elif "sum_div" == entry_point:  # Mbpp/295
                            exact_match = exact_match or out == 0
                        elif "surface_Area" == entry_point:  # Mbpp/581
                            exact_match = exact_match or abs(out - _surface_Area(*inp)) <= atol
                        elif "digit_distance_nums" == entry_point:  # Mbpp/558
                            exact_match = exact_match or out == _digit_distance_nums(*inp)
                        elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
                            exact_match = set(out) == set(exp)
                        elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
                            if isinstance(out, bool):
                                exact_match = out == exp
                            else:
                                exact_match = exp == (out is not None)

                    if dataset == "humaneval":
                        if "find_zero" == entry_point:
                            # EvalPlus 0.3.1's `continue` skips counting this input as passed,
                            # so HumanEval/32 fails whatever the solution: kept, as the scores
                            # this reproduces were measured with it.
                            assert abs(_poly(*inp, out)) <= atol
                            continue

                    if atol == 0 and is_floats(exp):
                        atol = 1e-6  # enforce atol for float comparison (and keep it, as EvalPlus)
                    if not exact_match and atol != 0:
                        assert type(out) == type(exp)  # noqa: E721 (EvalPlus's check)
                        if isinstance(exp, (list, tuple)):
                            assert len(out) == len(exp)
                        assert _allclose(out, exp, rtol=1e-07, atol=atol)
                    else:
                        assert exact_match
                except BaseException:
                    details[i] = False
                    progress.value += 1
                    if fast_check:
                        raise
                    continue

                details[i] = True
                progress.value += 1

            stat.value = _SUCCESS
        except BaseException:
            stat.value = _FAILED
        # Needed for cleaning up.
        shutil.rmtree = rmtree
        os.rmdir = rmdir
        os.chdir = chdir


def untrusted_check(
    dataset: str,
    code: str,
    inputs: list,
    entry_point: str,
    expected: list,
    atol: float,
    ref_time: list[float],
    fast_check: bool = False,
    min_time_limit: float = DEFAULT_MIN_TIME_LIMIT,
    gt_time_limit_factor: float = DEFAULT_GT_TIME_LIMIT_FACTOR,
) -> tuple[str, list[bool]]:
    """evalplus.eval.untrusted_check: the solution in a forked child, its status and details."""
    time_limits = [max(min_time_limit, gt_time_limit_factor * t) for t in ref_time]
    timeout = min(_TIMEOUT_PER_TASK, sum(time_limits)) + 1
    if not fast_check:
        timeout += 1  # extra time for data collection

    # Fork explicitly: this module lives only in sys.modules, which a spawned child lacks.
    context = multiprocessing.get_context("fork")
    progress = context.Value("i", 0)
    stat = context.Value("i", _UNKNOWN)
    details = context.Array("b", [False for _ in range(len(inputs))])

    p = context.Process(
        target=unsafe_execute,
        args=(
            dataset,
            entry_point,
            code,
            inputs,
            expected,
            time_limits,
            atol,
            fast_check,
            stat,
            details,
            progress,
        ),
    )
    p.start()
    p.join(timeout=timeout + 1)
    if p.is_alive():
        p.terminate()
        time.sleep(0.1)
    if p.is_alive():
        p.kill()
        time.sleep(0.1)

    status = _MAPPING[stat.value]
    passed = list(details[: progress.value])
    if not status:
        status = TIMEOUT
    if status == PASS:
        if len(passed) != len(inputs) or not all(passed):
            status = FAIL
    return status, passed


def main(payload: str) -> None:
    """Check the task in ``payload`` (base64 of a pickled dict, see ``plus.program``) on its
    suites in order ("base", then "plus": EvalPlus's "+" score needs both), stopping at the
    first that fails; exit 0 when all passed."""
    task = pickle.loads(base64.b64decode(payload))
    reference = task["prompt"] + task["canonical_solution"]
    statuses: dict[str, str] = {}
    for suite in task["suites"]:
        inputs = task[f"{suite}_input"]
        try:
            expected, ref_time = trusted_exec(
                reference,
                inputs,
                task["entry_point"],
                record_time=True,
                output_not_none=task["output_not_none"],
            )
        except BaseException as error:
            print(json.dumps({"ground_truth_error": f"{type(error).__name__}: {error}"[:500]}))
            sys.exit(GROUND_TRUTH_FAILED)
        statuses[suite], _ = untrusted_check(
            task["dataset"],
            task["solution"],
            inputs,
            task["entry_point"],
            expected=expected,
            atol=task["atol"],
            ref_time=ref_time,
            fast_check=True,  # evalplus.evaluate's default (no --test-details)
        )
        if statuses[suite] != PASS:
            break
    print(json.dumps(statuses))
    passed = len(statuses) == len(task["suites"]) and all(s == PASS for s in statuses.values())
    sys.exit(0 if passed else 1)
