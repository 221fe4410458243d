"""Does a block-diffusion fine-tune compute an arithmetic step's result, or copy it?

    .venv/bin/python experiments/tiny_repro/probe_arithmetic.py \\
        experiments/tiny_repro/runs/bd/seed0/export --out metrics/arith_gap/probe_bd_seed0.json

Each arithmetic test problem ("3 + 4 = 7. 7 - 2 = 5. 5 + 1 = 6. The answer is 6.") is rendered
as in training, and each step's result r is scored, teacher-forced, through the shifted logit
of one block-causal forward (the decoder's attention) in four conditions:

- left to right: every token before r clean; r and the rest of its block masked. This is all
  that decoding strictly left to right ever shows the model;
- copy visible: the same, plus the later copy of r in the block left clean (the operand that
  starts the next step, or the final answer after the last step);
- nothing after: r masked and the sequence cut after it, so no mask token follows (never
  seen in training, where every block is full);
- operands masked: "left to right" with the step's own operands ("a op b" before "= r") masked
  too, where they lie in r's block (steps 2 and 3; step 1's are in the prompt's block).

In training a masked result often has its copy visible: a model that learned to copy scores
higher with the copy than without. The third asks whether the mask tokens after r disturb
it; the fourth, whether it reads the operands (it drops without them) or gets r elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.data.sft import render_chat
from src.data.synthetic import generate_split
from src.diffusion import IGNORE_INDEX
from src.diffusion.masks import additive_mask, block_causal_allowed
from src.model import load_export

CONDITIONS = ("left to right", "copy visible", "nothing after", "operands masked")
STEPS = 3  # worked steps per arithmetic answer


def step_results(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int
) -> list[tuple[int, int]]:
    """(position of step k's result, position of its later copy) for k = 1..3, in `ids`."""
    equals = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" ="))
    assert len(equals) == 1, "the probe expects ' =' to be one token"
    results = [i + 2 for i in range(start, len(ids)) if ids[i] == equals[0]]
    assert len(results) == STEPS, f"expected {STEPS} worked steps, found {len(results)}"
    final = max(i for i in range(start, len(ids)) if ids[i] == ids[results[-1]])
    copies = [r + 3 for r in results[:-1]] + [final]
    for r, c in zip(results, copies, strict=True):
        assert ids[r] == ids[c], "the copy must repeat the result"
    return list(zip(results, copies, strict=True))


@torch.no_grad()
def predicted(
    model: PreTrainedModel,
    ids: list[int],
    masked: list[int],
    end: int,
    target: int,
    block_size: int,
    mask_id: int,
) -> int:
    """Argmax for position `target` through the logit at `target - 1`, the sequence cut at
    `end` (mask-padded) and `masked` positions replaced by the mask token."""
    tokens = torch.tensor(ids[:end] + [mask_id] * max(0, end - len(ids)))  # [l]
    tokens[masked] = mask_id
    pos = torch.arange(end)
    mask = additive_mask(block_causal_allowed(pos[:, None], pos[None, :], block_size), model.dtype)
    logits = model(input_ids=tokens[None], attention_mask=mask[None], position_ids=pos[None])
    scores = logits.logits[0, target - 1]  # [V]
    scores[mask_id] = -torch.inf
    return int(scores.argmax())


def probe(export_dir: str, limit: int) -> dict:
    export = load_export(export_dir)
    tok, settings, model = export.tokenizer, export.settings, export.model
    block, mask_id = settings["block_size"], settings["mask_token_id"]
    # The default test split (200 problems) holds 50 arithmetic ones.
    items = [i for i in generate_split("test", 200) if i["task"] == "arithmetic"][:limit]
    hits = {c: [0] * STEPS for c in CONDITIONS}
    for item in items:
        ids, labels = render_chat(tok, item["messages"])
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        for k, (r, copy) in enumerate(step_results(tok, ids, start)):
            block_start = r // block * block
            block_end = block_start + block
            rest = list(range(r, block_end))
            shown = {
                "left to right": (rest, block_end),
                "copy visible": ([p for p in rest if p != copy], block_end),
                "nothing after": ([r], r + 1),
                # "a op b = r": a, op and b sit 6, 5 and 3 tokens before r. Earlier blocks
                # are clean context by construction, so only those in r's block are masked.
                "operands masked": (
                    rest + [p for p in (r - 6, r - 5, r - 3) if p >= block_start],
                    block_end,
                ),
            }
            for condition, (masked, end) in shown.items():
                guess = predicted(model, ids, masked, end, r, block, mask_id)
                hits[condition][k] += guess == ids[r]
    return {
        "ckpt": str(export_dir),
        "problems": len(items),
        "accuracy_by_step": {c: [h / len(items) for h in hits[c]] for c in CONDITIONS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--limit", type=int, default=50, help="arithmetic test problems")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = probe(args.export, args.limit)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
