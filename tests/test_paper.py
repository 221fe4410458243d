"""`python -m src.paper` and Table 1 (issue 22): every row and decoder into one run folder,
the table with missing rows as missing (never 0), the average over the rows every decoder
has beside the paper's, tokens/s and tokens per forward per decoder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from src.config import ConfigError
from src.evaluation.paper import run_paper
from src.evaluation.table import PUBLISHED, ROWS, markdown, read_table
from tests.conftest import ROOT
from tests.fixtures.exports import make_export

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "#### 7"},
    {"question": "What is 2 times 5?", "answer": "#### 10"},
]
ROWS_CODE = ("humaneval", "humaneval_plus", "mbpp", "mbpp_plus")
MATH_ROWS = [
    {"problem": "What is $1+1$?", "answer": "2"},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}"},
]


def _write(path: Path, content: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _metrics(score: float, tokens: int, forwards: int, seconds: float) -> dict:
    return {
        "metric": "accuracy",
        "accuracy": score,
        "num_scored": 4,
        "tokens": tokens,
        "forwards": forwards,
        "seconds": seconds,
        "decode": {"max_new_tokens": 2048, "threshold": 1.0},
        "protocol": {"follows": True},
    }


def test_the_table_shows_missing_and_failed_rows_as_such(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    settings = {"decode": {"sub_block_size": 8, "use_sub_block_cache": False}, "limit": None}
    settings |= {"batch_size": 1, "max_new_tokens": None, "threshold": None}
    _write(
        run / "paper.json",
        {
            "ckpt": "bd",
            "ar_ckpt": "ar",
            "decoders": ["diffusion", "ar"],
            "checkpoints": {"diffusion": "bd", "ar": "ar"},
            "rows": ["gsm8k", "math", "mmlu"],
            "published": "7B",
            "settings": settings,
        },
    )
    _write(run / "gsm8k/diffusion/metrics.json", _metrics(0.5, 300, 100, 2.0))
    _write(run / "gsm8k/ar/metrics.json", _metrics(0.0, 200, 200, 4.0))  # a real 0
    _write(run / "math/diffusion/error.txt", "RuntimeError: out of memory\n")
    _write(run / "math/ar/metrics.json", _metrics(0.25, 100, 100, 1.0))
    for decoder, score in (("diffusion", 0.75), ("ar", 0.5)):
        lm = {"task": "mmlu", "score": score, "follows": True}
        _write(run / f"mmlu/{decoder}/lm_eval.json", lm)

    table = read_table(run)
    cells = {r["row"]: r["cells"] for r in table["rows"]}
    assert list(cells) == [
        *("humaneval", "humaneval_plus", "mbpp", "mbpp_plus", "gsm8k", "math"),
        *("ifeval", "mmlu", "gpqa"),
    ]
    assert cells["humaneval"]["ar"] == {"missing": True}
    assert cells["gsm8k"]["ar"]["score"] == 0.0
    assert cells["math"]["diffusion"] == {"failed": "RuntimeError: out of memory"}
    # Only rows every decoder has count, beside the paper's mean of the same rows.
    average = table["average"]
    assert average["rows"] == ["gsm8k", "mmlu"]
    assert average["scores"] == {"diffusion": (50 + 75) / 2, "ar": (0 + 50) / 2}
    assert average["published"] == pytest.approx((PUBLISHED["7B"]["gsm8k"] + 66.6) / 2)
    assert table["speed"]["diffusion"] == {"tokens_per_second": 150.0, "tokens_per_forward": 3.0}
    assert table["speed"]["ar"] == {"tokens_per_second": 60.0, "tokens_per_forward": 1.0}
    text = markdown(table)
    assert "| HumanEval | missing | missing | 63.4 |" in text
    assert "| GSM8K | 50.0 | 0.0 | 83.7 |" in text
    assert "| MATH | failed | 25.0 | 61.6 |" in text
    assert "| average (2 of 9 rows) | 62.5 | 25.0 | 75.2 |" in text

    from src.report import main

    monkeypatch.setattr(sys, "argv", ["src.report", str(run), "--out", str(tmp_path / "out")])
    main()
    assert (tmp_path / "out" / "table1.md").read_text() == text
    assert json.loads((tmp_path / "out" / "table1.json").read_text()) == table


def test_the_command_defaults_to_every_row_under_the_protocol(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("paper", ["ckpt=bd", "ar_ckpt=ar"])
    assert list(cfg.decoders) == ["diffusion", "ar"] and cfg.published == "7B"
    assert [*cfg.benchmarks, *cfg.lm_eval] == [row for row, _ in ROWS]
    for benchmark in cfg.benchmarks.values():
        assert dict(benchmark.decode) == {"max_new_tokens": 2048, "threshold": 1.0}
    # The code columns are EvalPlus's: its base tests for HumanEval and MBPP, all for the "+".
    code = {row: (cfg.benchmarks[row].name, cfg.benchmarks[row].tests) for row in ROWS_CODE}
    assert code == {
        "humaneval": ("humaneval_plus", "base"),
        "humaneval_plus": ("humaneval_plus", "plus"),
        "mbpp": ("mbpp_plus", "base"),
        "mbpp_plus": ("mbpp_plus", "plus"),
    }
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bad = compose("paper", ["ckpt=bd", "ar_ckpt=ar", "decoders=[diffusion,beam]"])
    with pytest.raises(ConfigError, match="decoder='beam'"):
        run_paper(bad, str(tmp_path))
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    make_export(root / "bd", block_size=8)
    make_export(root / "ar", block_size=8, objective="ar")
    _write(root / "gsm8k.jsonl", "".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    _write(root / "math.jsonl", "".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return root


def paper_cfg(root: Path, *overrides: str):
    """The CPU version of the paper's command: the tiny exports, two problems of HumanEval+
    (EvalPlus's format, in the sandbox), GSM8K and MATH (local files), lm-eval fixtures as the
    IFEval and MMLU (2-shot, multi-turn) rows, 16 new tokens."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "paper",
            [
                f"ckpt={root}/bd",
                f"ar_ckpt={root}/ar",
                "limit=2",
                "max_new_tokens=16",
                "decode.sub_block_size=4",
                "batch_size=2",
                "~benchmarks.humaneval",
                "~benchmarks.mbpp",
                "~benchmarks.mbpp_plus",
                f"benchmarks.humaneval_plus.path={ROOT}/tests/fixtures/evalplus/HumanEvalPlus.jsonl",
                f"benchmarks.gsm8k.path={root}/gsm8k.jsonl",
                f"benchmarks.math.path={root}/math.jsonl",
                "~lm_eval.gpqa",
                "lm_eval.ifeval.task=ifeval_fast_dllm_fixture",
                "lm_eval.mmlu.task=mmlu_fast_dllm_fixture",
                "lm_eval.mmlu.num_fewshot=2",
                f"lm_eval_include_path={ROOT}/tests/fixtures/lm_eval",
                *overrides,
            ],
        )


@pytest.mark.slow
def test_one_command_runs_every_row_and_decoder(inputs: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the lm-eval fixture names its data file from the repo root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table_md = run_paper(paper_cfg(inputs), str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    table = json.loads((tmp_path / "table1.json").read_text())
    assert table_md.read_text() == markdown(table)
    cells = {r["row"]: r["cells"] for r in table["rows"]}
    for row in ("humaneval_plus", "gsm8k", "math"):
        for decoder, ckpt in (("diffusion", "bd"), ("ar", "ar")):
            metrics = json.loads((tmp_path / row / decoder / "metrics.json").read_text())
            assert metrics["decoder"] == decoder and metrics["ckpt"] == str(inputs / ckpt)
            assert metrics["num_scored"] == 2 and metrics["decode"]["max_new_tokens"] == 16
            # The threshold is the protocol's (1 for the generated tasks), the budget ours.
            assert metrics["protocol"]["deviations"] == {"max_new_tokens": 16} or decoder == "ar"
            assert metrics["decode"]["threshold"] == 1.0
            assert cells[row][decoder]["source"] == "src.eval"
            assert (tmp_path / row / decoder / "samples.jsonl").is_file()
    for row in ("ifeval", "mmlu"):
        assert {d: cells[row][d]["source"] for d in ("diffusion", "ar")} == {
            "diffusion": "lm_eval",
            "ar": "lm_eval",
        }
    ifeval = json.loads((tmp_path / "ifeval" / "diffusion" / "lm_eval.json").read_text())
    assert ifeval["decode"]["max_new_tokens"] == 16  # the command's budget, not the task's
    mmlu = json.loads((tmp_path / "mmlu" / "ar" / "lm_eval.json").read_text())
    assert mmlu["num_fewshot"] == 2 and "acc,none" in mmlu["results"]
    for row in ("humaneval", "mbpp", "mbpp_plus", "gpqa"):
        assert cells[row] == {"diffusion": {"missing": True}, "ar": {"missing": True}}
    assert table["average"]["rows"] == ["humaneval_plus", "gsm8k", "math", "ifeval", "mmlu"]
    assert 1.0 < table["speed"]["ar"]["tokens_per_forward"] <= 2.0  # one per row, batch 2

    # The same command into the same folder resumes (nothing is decoded again) ...
    before = (tmp_path / "gsm8k" / "diffusion" / "metrics.json").stat().st_mtime_ns
    run_paper(paper_cfg(inputs), str(tmp_path))
    assert (tmp_path / "gsm8k" / "diffusion" / "metrics.json").stat().st_mtime_ns == before
    # ... and refuses other settings there.
    with pytest.raises(ConfigError, match="other settings|other limit"):
        run_paper(paper_cfg(inputs, "limit=1"), str(tmp_path))
