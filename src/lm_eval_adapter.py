"""lm-evaluation-harness with this pipeline's model `fast_dllm` (`src.evaluation.lm_eval`).

lm-eval (0.4.13) finds models only in its own registry (no plugin entry points), so run it
through this module, which registers the model and hands its arguments to lm-eval's CLI::

    python -m src.lm_eval_adapter --model fast_dllm \\
        --model_args pretrained=artifacts/tiny,threshold=0.9,sub_block_size=8 \\
        --tasks gsm8k --apply_chat_template --batch_size 8
    python -m src.lm_eval_adapter --model fast_dllm --model_args pretrained=<export> \\
        --include_path tests/fixtures/lm_eval --tasks fast_dllm_synthetic_gen
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import src.evaluation.lm_eval  # noqa: F401  (registers `fast_dllm`)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line, with `fast_dllm` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
