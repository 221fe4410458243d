"""The recipe study's reading of a wrong arithmetic answer (experiments/recipe/errors.py)."""

from __future__ import annotations

import pytest

from experiments.recipe.errors import first_error
from src.data.synthetic import generate_split

ARITHMETIC = [i for i in generate_split("test", 200) if i["task"] == "arithmetic"]


def test_a_correct_answer_has_no_error():
    for item in ARITHMETIC:
        prompt, answer = (m["content"] for m in item["messages"])
        assert first_error(prompt, answer) is None


@pytest.mark.parametrize(
    ("prompt", "response", "kind"),
    [  # the first three were decoded by the recipe study's AR-term runs; the rest are edits
        ("Compute 7 - 2 - 3 + 6", "7 - 2 = 5. 5 - 3 = 2. 3 + 6 = 8. The answer is 8.", "carry"),
        ("Compute 5 + 1 - 5 + 7", "5 + 1 = 6. 6 - 5 = 1. 1 + 7 = 8. The answer is 7.", "carry"),
        ("Compute 5 + 3 - 8 + 3", "5 + 3 = 9. 9 - 8 = 1. 1 + 3 = 4. The answer is 4.", "compute"),
        ("Compute 5 + 3 - 8 + 3", "5 + 3 = 8. 8 - 7 = 1. 1 + 3 = 4. The answer is 4.", "read"),
        ("Compute 5 + 3 - 8 + 3", "6 + 3 = 9. 9 - 8 = 1. 1 + 3 = 4. The answer is 4.", "read"),
        ("Compute 5 + 3 - 8 + 3", "5 + 3 = 8. 8 - 8 = 0. 0 + 3 = 3. The answer is", "format"),
    ],
)
def test_the_first_error_is_named(prompt, response, kind):
    assert first_error(prompt, response) == kind
