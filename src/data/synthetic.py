"""A built-in synthetic instruction corpus that a tiny model learns in minutes on a CPU.

Four task families with multi-token answers (about 20-60 tokens with the synthetic tokenizer).
Most answer tokens are template; the few "hard" ones are single tokens (digits, letters) that
are either copied from the prompt or one of a few dozen facts, so a tiny transformer learns
them in minutes, and the template makes parallel (diffusion) decoding confident:

- ``arithmetic``: three single-digit additions/subtractions, answered with worked steps;
- ``sort``: distinct digits sorted ascending, then the smallest and largest;
- ``reverse``: distinct digits in reverse order, then the first and last;
- ``template``: a booking confirmation filled in from a few digit fields.

Every problem instance is assigned to a split by a stable hash of its user prompt, so the
splits are disjoint for every seed; the seed only picks which instances are drawn.
Answers are scored by exact match after whitespace normalisation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

SPLITS = ("train", "validation", "test")
# Share of hash buckets (out of 100) per split; the rest of a bucket range goes to the next split.
_SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """Three worked steps with the running total kept in 0..9: every step is one of 90
    single-digit facts, and every number is one token."""
    total = rng.randint(0, 9)
    terms = [str(total)]
    steps = []
    for _ in range(3):
        op = "+" if total == 0 else "-" if total == 9 else rng.choice("+-")
        operand = rng.randint(1, 9 - total if op == "+" else total)
        new_total = total + operand if op == "+" else total - operand
        terms.append(f"{op} {operand}")
        steps.append(f"{total} {op} {operand} = {new_total}.")
        total = new_total
    prompt = f"Compute {' '.join(terms)}"
    return prompt, f"{' '.join(steps)} The answer is {total}."


def _sort(rng: random.Random) -> tuple[str, str]:
    # Distinct digits: the next output is the smallest digit above the last one.
    digits = rng.sample(range(10), rng.randint(4, 5))
    ordered = sorted(digits)
    prompt = f"Sort: {' '.join(map(str, digits))}"
    answer = (
        f"In ascending order: {', '.join(map(str, ordered))}. "
        f"The smallest is {ordered[0]} and the largest is {ordered[-1]}."
    )
    return prompt, answer


def _reverse(rng: random.Random) -> tuple[str, str]:
    # Digits, not letters: each digit is its own token and frequent enough (it is shared with
    # the other families) that a tiny model learns to copy it quickly.
    digits = rng.sample(range(10), rng.randint(4, 5))
    prompt = f"Reverse: {' '.join(map(str, digits))}"
    answer = (
        f"Reversed: {', '.join(map(str, reversed(digits)))}. "
        f"The first item was {digits[0]} and the last was {digits[-1]}."
    )
    return prompt, answer


def _template(rng: random.Random) -> tuple[str, str]:
    # Each field is one digit found by the word before it in the prompt: a pure copy.
    room, floor, guests, day = (rng.randint(1, 9) for _ in range(4))
    prompt = f"Booking: room {room}, floor {floor}, guests {guests}, day {day}"
    answer = (
        f"Dear guest, your room is {room} on floor {floor} for {guests} guests. "
        f"Please arrive on day {day}. Best wishes."
    )
    return prompt, answer


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "reverse": _reverse,
    "template": _template,
}
TASKS: tuple[str, ...] = tuple(_GENERATORS)


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash (independent of seed and process)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def generate_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` items of `split`, in random order, an equal share (+-1) of each task family.

    Each item is ``{"task", "messages": [user, assistant], "answer"}``. Validation and test
    items are distinct; train items may repeat (the smallest family, template, has ~6.5k instances).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"synthetic-{seed}-{split}")
    seen: set[str] = set()
    items = []
    # Rejection sampling: a draw is kept only if its prompt hashes into `split` (and, for
    # evaluation splits, is new). Running out of budget means the families hold too few.
    budget = 200 * n + 1000
    while len(items) < n:
        task = TASKS[len(items) % len(TASKS)]
        prompt, answer = _GENERATORS[task](rng)
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n} distinct {split!r} items; ask for fewer")
        if split_of(prompt) != split or (split != "train" and prompt in seen):
            continue
        seen.add(prompt)
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        items.append({"task": task, "messages": messages, "answer": answer})
    # Samples are packed in order, so a fixed task order would tie each task to a position in
    # the context: a model then learns the position instead of reading the prompt.
    rng.shuffle(items)
    return items


def exact_match(response: str, answer: str) -> bool:
    """Equality up to whitespace (runs of whitespace collapse, ends are stripped)."""
    return response.split() == answer.split()
