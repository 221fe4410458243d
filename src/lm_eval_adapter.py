"""lm-evaluation-harness with this pipeline's model `fast_dllm` (`src.evaluation.lm_eval`).

lm-eval (0.4.13) finds models only in its own registry (no plugin entry points), so run it
through this module, which registers the model and hands its arguments to lm-eval's CLI::

    python -m src.lm_eval_adapter --model fast_dllm \\
        --model_args pretrained=artifacts/tiny,threshold=0.9,sub_block_size=8 \\
        --tasks gsm8k --apply_chat_template --batch_size 8
    python -m src.lm_eval_adapter --model fast_dllm --model_args pretrained=<export> \\
        --include_path tests/fixtures/lm_eval --tasks fast_dllm_synthetic_gen

The released evaluation (SPEC 4.1; its generated tasks at threshold 1, 2048 new tokens). Its
`minerva_math` does not load here: lm-eval's task requires antlr4 4.11, and Hydra's omegaconf
pins 4.9; MATH is `python -m src.eval benchmark=math` (math-verify, as minerva_math scores)::

    python -m src.lm_eval_adapter --model fast_dllm --tasks gsm8k,ifeval \\
        --model_args pretrained=<export>,threshold=1,max_new_tokens=2048 --num_fewshot 0 \\
        --apply_chat_template --fewshot_as_multiturn --batch_size 32
    python -m src.lm_eval_adapter --model fast_dllm --tasks mmlu --num_fewshot 5 \\
        --model_args pretrained=<export> --apply_chat_template --fewshot_as_multiturn
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from src.config import ConfigError
from src.evaluation.ifeval import use_packaged_punkt
from src.evaluation.lm_eval import check_model_args  # importing it registers `fast_dllm`


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval.__main__.cli_evaluate`), with `fast_dllm` registered,
    its `--model_args` checked before lm-eval loads tasks or the model, a load fault one line
    (and IFEval's NLTK data found offline)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    use_packaged_punkt()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    try:
        if getattr(args, "model", None) == "fast_dllm":
            check_model_args(getattr(args, "model_args", None) or {})
        parser.execute(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
