"""Where a wrong arithmetic answer first goes wrong, read off its text.

An answer is "a op b = r. r op c = s. s op d = t. The answer is t." (src/data/synthetic.py).
Walking it left to right, the first token that breaks the chain names the error:

- carry: an operand (or the final answer) that must repeat the previous step's written result
  does not. The probe (`probe_arithmetic.py`) shows the result itself is right when decoded
  left to right, so this is the parallel-commit failure: the copy was committed while the
  result it repeats was still masked;
- read: the prompt's operand or operator is miscopied;
- compute: a step's result is wrong for the operands it wrote;
- format: the answer does not have the worked-steps shape.
"""

from __future__ import annotations

import re

from experiments.tiny_repro.probe_arithmetic import STEPS

KINDS = ("carry", "read", "compute", "format")
_PROMPT = re.compile(rf"Compute (\d)((?: [+-] \d){{{STEPS}}})")
_STEP = r"(\d) ([+-]) (\d) = (\d+)\. "  # left, op, right, result
_ANSWER = re.compile(_STEP * STEPS + r"The answer is (\d+)\.")


def first_error(prompt: str, response: str) -> str | None:
    """The kind (`KINDS`) of the first error in `response` to the arithmetic `prompt`; None
    when it has none."""
    asked = _PROMPT.search(prompt)
    if asked is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    written = _ANSWER.fullmatch(response.strip())
    if written is None:
        return "format"
    terms = asked.group(2).split()  # ["+", "3", "-", "5", ...]
    carried = asked.group(1)  # step 1's left operand is read from the prompt
    for k in range(STEPS):
        left, op, right, result = written.groups()[4 * k : 4 * k + 4]
        if left != carried:
            return "read" if k == 0 else "carry"
        if (op, right) != (terms[2 * k], terms[2 * k + 1]):
            return "read"
        if int(result) != (int(left) + int(right) if op == "+" else int(left) - int(right)):
            return "compute"
        carried = result
    return "carry" if written.groups()[-1] != carried else None
