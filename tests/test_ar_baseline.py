"""The AR baseline is greedy whatever the export's generation_config.json says (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.decoding import load_decoder
from tests.fixtures.exports import DECODE, make_export

MAX_NEW = 24
# What exports inherit from Qwen2.5-7B-Instruct's generation_config.json.
QWEN_GENERATION = {"repetition_penalty": 1.05, "top_k": 20, "top_p": 0.8, "do_sample": True}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(model, ids: list[int], stop: int, max_new: int, vocab_limit: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence forwarded at every step, no cache."""
    toks = list(ids)
    while len(toks) - len(ids) < max_new:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([toks])).logits[0, -1]
        toks.append(int(logits[:vocab_limit].argmax()))
        if toks[-1] == stop:
            break
    return toks[len(ids) :]


def test_ar_decodes_greedily_despite_the_generation_config(tmp_path: Path) -> None:
    export = make_export(tmp_path / "export", objective="ar")
    path = export / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | QWEN_GENERATION))
    decoder = load_decoder(str(export), {**DECODE, "max_new_tokens": MAX_NEW}, decoder="ar")
    model = decoder.export.model
    assert model.generation_config.repetition_penalty == 1.05  # the file is what it loaded
    model.double()  # cached and cache-free forwards then agree beyond any argmax margin
    tokenizer = decoder.tokenizer
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        for text in ("Sort: 7 2 9 4 1", "Reverse: 3 8", "Compute 4 + 3 - 5 + 2 + 1 + 1")
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop = decoder.export.settings["stop_token_id"]
    # Two tokens the prompts lack, within 5% of each other and far above the rest: greedy
    # repeats the first; a 1.05 repetition penalty would switch to the second once it repeats.
    special = set(tokenizer.all_special_ids)
    unused = [t for t in range(len(tokenizer)) if t not in special and all(t not in p for p in ids)]
    first, second = unused[:2]
    boost = torch.zeros(model.lm_head.out_features, dtype=model.dtype)
    boost[[first, second]] = torch.tensor([100.0, 99.0], dtype=model.dtype)
    model.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    expected = [greedy(model, p, stop, MAX_NEW, len(tokenizer)) for p in ids]
    assert decoder.generate(ids).tokens == expected  # batched: each its tokens alone
    assert [decoder.generate([p]).tokens[0] for p in ids] == expected
