"""Evaluation: decode and score benchmarks (`runner`), what `python -m src.eval` does with an
export (`run`), the benchmarks (`benchmarks`), the sandbox model-written code runs in
(`sandbox`), the lm-eval model (`lm_eval`), decode speed benchmarks (`decode_bench`) and sweep
reports (`report`)."""
