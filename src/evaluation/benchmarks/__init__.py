"""Evaluation benchmarks: ``get(name, **options)`` -> ``check``, ``load``, ``messages``, ``score``.

Names: gsm8k, math, humaneval, mbpp, humaneval_plus, mbpp_plus, synthetic. Options are those of ``conf/benchmark/<name>.yaml``
(``path``, ``hub_name``, ``hub_config``, ``split``, ``limit``, plus per-benchmark ones), so Hydra
can build one with ``hydra.utils.instantiate(cfg.benchmark)``::

    bench = get("humaneval", limit=5)
    bench.check()  # before anything expensive: HumanEval/MBPP refuse to start without bubblewrap
    problems = bench.load()
    ok = bench.score(problems[0], "```python\\n...\\n```")
"""

from __future__ import annotations

from src.evaluation.benchmarks.base import Benchmark
from src.evaluation.benchmarks.code import MBPP, HumanEval
from src.evaluation.benchmarks.plus import HumanEvalPlus, MBPPPlus
from src.evaluation.benchmarks.reasoning import GSM8K, MATH
from src.evaluation.benchmarks.synthetic import Synthetic

BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (GSM8K, MATH, HumanEval, MBPP, HumanEvalPlus, MBPPPlus, Synthetic)
}
NAMES: tuple[str, ...] = tuple(BENCHMARKS)


def get(name: str, **options: object) -> Benchmark:
    """The benchmark called ``name``, configured with ``options`` (see ``Benchmark``)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(NAMES)}")
    return BENCHMARKS[name](**options)


__all__ = ["BENCHMARKS", "NAMES", "Benchmark", "get"]
