"""Data layer: synthetic corpus, tokenizer, chat SFT rendering/packing, datamodule."""

from __future__ import annotations

import logging

import pytest
import torch

from src.config import ConfigError
from src.data.datamodule import ChatDataModule
from src.data.jsonl import read_jsonl, write_jsonl
from src.data.sft import build_sft_dataset, pack, render_chat
from src.data.synthetic import TASKS, exact_match, generate_split, split_of
from src.data.tokenizer import IM_END, IM_START, synthetic_tokenizer, train_tokenizer
from src.diffusion.loss import IGNORE_INDEX
from src.model import MASK_TOKEN, mask_token_id_of, stop_token_of

SEQ_LEN, BLOCK = 256, 32


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(0)


def _supervised_text(tok, labels: list[int]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_generate_split_is_deterministic_per_seed():
    assert generate_split("train", 40, seed=3) == generate_split("train", 40, seed=3)
    assert generate_split("train", 40, seed=3) != generate_split("train", 40, seed=4)


def test_splits_are_disjoint_and_cover_every_task():
    prompts = {}
    for split in ("train", "validation", "test"):
        items = generate_split(split, 400, seed=0)
        assert {item["task"] for item in items} == set(TASKS)
        prompts[split] = {item["messages"][0]["content"] for item in items}
        if split != "train":
            assert len(prompts[split]) == 400  # evaluation items are distinct
        assert all(split_of(p) == split for p in prompts[split])
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


def test_items_have_chat_shape_and_answers_of_20_to_60_tokens(tok):
    for item in generate_split("test", 200, seed=1):
        user, assistant = item["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == item["answer"]
        n = len(tok(item["answer"], add_special_tokens=False)["input_ids"])
        assert 20 <= n <= 60, (item["task"], n)


def test_task_order_is_shuffled_but_balanced():
    # Samples are packed in order: a periodic task order would tie tasks to context positions.
    tasks = [item["task"] for item in generate_split("train", 400, seed=0)]
    assert all(tasks.count(task) == 100 for task in TASKS)
    assert all(set(tasks[start::4]) == set(TASKS) for start in range(4))


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("dev", 3)


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  Sorted: 1  2\n3 ", "Sorted: 1 2 3")
    assert not exact_match("Sorted: 1 2 4", "Sorted: 1 2 3")
    assert not exact_match("sorted: 1 2 3", "Sorted: 1 2 3")


def test_jsonl_roundtrip(tmp_path):
    items = generate_split("validation", 5)
    write_jsonl(tmp_path / "d" / "v.jsonl", items)
    assert read_jsonl(tmp_path / "d" / "v.jsonl") == items


def test_tokenizer_specials_digits_and_template(tok):
    assert tok.eos_token == IM_END
    ids = {t: tok.convert_tokens_to_ids(t) for t in (IM_START, IM_END, MASK_TOKEN, tok.pad_token)}
    assert len(set(ids.values())) == 4 and None not in ids.values()
    assert len(tok) <= 400
    # Every digit of a number is its own token.
    tokens = tok.convert_ids_to_tokens(tok("x 1234567890", add_special_tokens=False)["input_ids"])
    assert tokens[-10:] == list("1234567890")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    text = "Compute 3 + 4. <|im_start|>|<MASK>|"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_stop_token_is_what_ends_an_assistant_turn_not_eos(tok):
    # A base checkpoint's eos (Qwen2.5: <|endoftext|>) differs from the token closing a turn.
    base = train_tokenizer(0)
    base.eos_token = base.pad_token
    assert base.eos_token != IM_END
    assert stop_token_of(base) == (IM_END, base.convert_tokens_to_ids(IM_END))
    item = generate_split("train", 1)[0]
    _, labels = render_chat(base, item["messages"])
    assert _supervised_text(base, labels) == item["answer"] + IM_END
    # A template whose turns end with plain text gives no stop token: one line, not a guess.
    base.chat_template = "{% for m in messages %}{{ m['content'] + '\\n\\n' }}{% endfor %}"
    with pytest.raises(ConfigError, match="not a special token"):
        stop_token_of(base)
    base.chat_template = None
    with pytest.raises(ConfigError, match="no chat_template"):
        stop_token_of(base)


def test_tokenizer_training_is_deterministic_and_cached(tmp_path, tok):
    cached = synthetic_tokenizer(tmp_path, seed=0)
    assert cached.get_vocab() == tok.get_vocab()
    assert len(list(tmp_path.glob("seed0-v384-*/tokenizer.json"))) == 1
    reloaded = synthetic_tokenizer(tmp_path, seed=0)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == tok.chat_template
    assert mask_token_id_of(reloaded) == mask_token_id_of(tok)


def test_render_chat_labels_assistant_content_and_stop_only(tok):
    item = generate_split("train", 1)[0]
    input_ids, labels = render_chat(tok, item["messages"])
    assert len(input_ids) == len(labels)
    assert _supervised_text(tok, labels) == item["answer"] + IM_END
    # The unsupervised prefix is exactly the prompt with the assistant header.
    n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    prompt = tok.apply_chat_template(
        item["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(input_ids[:n_prompt]) == prompt
    # Nothing after the stop token: the template's trailing newline is cut.
    assert input_ids[-1] == tok.convert_tokens_to_ids(IM_END) and labels[-1] != IGNORE_INDEX


def test_render_chat_multi_turn_with_default_system_template():
    # A Qwen2.5-style template that injects a system prompt: spans must still be found.
    tok = train_tokenizer(0)
    tok.chat_template = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    messages = [
        {"role": "user", "content": "Reverse the list: a, b"},
        {"role": "assistant", "content": "Reversed: b, a"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Reversed: a, b"},
    ]
    _, labels = render_chat(tok, messages)
    assert _supervised_text(tok, labels) == f"Reversed: b, a{IM_END}Reversed: a, b{IM_END}"


def test_missing_chat_template_raises(tok):
    bare = train_tokenizer(0)
    bare.chat_template = None
    messages = generate_split("train", 1)[0]["messages"]
    # A config problem: train.main prints it as one `config error:` line, no traceback.
    with pytest.raises(ConfigError, match="chat_template"):
        render_chat(bare, messages)
    with pytest.raises(ConfigError, match="chat_template"):
        build_sft_dataset(bare, [{"messages": messages}], SEQ_LEN, BLOCK)
    with pytest.raises(ConfigError, match="chat_template"):
        ChatDataModule(bare, {"kind": "synthetic", "n_train": 1}, SEQ_LEN, BLOCK)


def test_seq_len_must_be_a_multiple_of_block_size(tok):
    with pytest.raises(ValueError, match="is not a multiple of diffusion.block_size"):
        build_sft_dataset(tok, generate_split("train", 2), 100, BLOCK)


@pytest.mark.parametrize("pad_to_block", [True, False])
def test_packed_contexts(tok, pad_to_block):
    items = generate_split("train", 60, seed=2)
    data = build_sft_dataset(tok, items, SEQ_LEN, BLOCK, pad_to_block=pad_to_block)
    mask_id, start_id = mask_token_id_of(tok), tok.convert_tokens_to_ids(IM_START)
    supervised, starts, n_mask, leaks = [], [], 0, 0
    for input_ids, labels in zip(data["input_ids"], data["labels"], strict=True):
        assert len(input_ids) == len(labels) == SEQ_LEN
        # Padding / tails hold the mask id and are never supervised.
        assert tok.pad_token_id not in input_ids
        assert all(
            t == IGNORE_INDEX for t, i in zip(labels, input_ids, strict=True) if i == mask_id
        )
        n_mask += input_ids.count(mask_id)
        leaks += _visible_after_answer(input_ids, labels, mask_id)
        starts += [p for p, i in enumerate(input_ids) if i == start_id][::2]  # user headers
        supervised.append(_supervised_text(tok, labels))
    rendered = sum(len(render_chat(tok, item["messages"])[0]) for item in items)
    assert n_mask == SEQ_LEN * len(data) - rendered
    assert len(starts) == len(items)
    # With padding every sample starts a block; without, some sample starts mid-block, and
    # its prompt then shows the noisy block where the previous answer ended.
    assert all(p % BLOCK == 0 for p in starts) == pad_to_block
    assert (leaks == 0) == pad_to_block
    # Every answer is supervised once, in order, followed by its stop token.
    assert "".join(supervised) == "".join(item["answer"] + IM_END for item in items)


def _visible_after_answer(input_ids: list[int], labels: list[int], mask_id: int) -> int:
    """Tokens never noised (unsupervised, not the mask id) that follow a supervised token in
    the same block: in the noisy stream they would show the model where an answer ends,
    which it never sees at inference."""
    count = 0
    for start in range(0, len(input_ids), BLOCK):
        ids, labs = input_ids[start : start + BLOCK], labels[start : start + BLOCK]
        first = next((i for i, t in enumerate(labs) if t != IGNORE_INDEX), len(labs))
        count += sum(
            t == IGNORE_INDEX and i != mask_id
            for i, t in zip(ids[first:], labs[first:], strict=True)
        )
    return count


def test_pack_truncates_and_drops_with_counts():
    seq, block, mask = 8, 4, 99
    samples = [
        ([], []),  # empty -> dropped
        (list(range(10)), [1, 2] + [IGNORE_INDEX] * 8),  # too long, labels survive the cut
        (list(range(10)), [IGNORE_INDEX] * 9 + [5]),  # too long, labels cut away -> dropped
        ([7, 8, 9], [IGNORE_INDEX, 8, 9]),  # padded to 4 tokens
        ([4, 5, 6, 7, 8], [IGNORE_INDEX, 5, 6, 7, 8]),  # padded to 8: does not fit -> new context
    ]
    contexts, stats = pack(samples, seq, block, pad_to_block=True, mask_token_id=mask)
    assert (stats.samples, stats.packed, stats.truncated) == (5, 3, 2)
    assert (stats.dropped_empty, stats.dropped_unsupervised, stats.contexts) == (1, 1, 3)
    assert contexts["input_ids"] == [
        list(range(8)),
        [7, 8, 9, mask, mask, mask, mask, mask],
        [4, 5, 6, 7, 8, mask, mask, mask],
    ]
    assert contexts["labels"][1] == [IGNORE_INDEX, 8, 9] + [IGNORE_INDEX] * 5


def test_build_drops_empty_assistant_turns(tok, caplog):
    items = generate_split("train", 3)
    empty = {"messages": [items[0]["messages"][0], {"role": "assistant", "content": " "}]}
    with caplog.at_level(logging.INFO, logger="src.data.sft"):
        data = build_sft_dataset(tok, [empty, *items], SEQ_LEN, BLOCK)
    assert "dropped 1 empty" in caplog.text
    text = "".join(_supervised_text(tok, labels) for labels in data["labels"])
    assert text == "".join(item["answer"] + IM_END for item in items)


def test_datamodule_batches_and_deterministic_shuffle(tok, tmp_path):
    source = {"kind": "synthetic", "n_train": 40, "n_val": 8, "n_test": 4, "seed": 0}
    orders = []
    for _ in range(2):
        dm = ChatDataModule(tok, source, SEQ_LEN, BLOCK, pad_to_block=True, batch_size=4)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"input_ids", "labels", "window_supervised"}
        assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ_LEN)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        # Outside a trainer a step is one batch: its supervised tokens, on every row.
        supervised = (batch["labels"] != -100).sum()
        assert torch.equal(batch["window_supervised"], supervised.repeat(4))
        orders.append(batch["input_ids"])
        val = next(iter(dm.val_dataloader()))
        assert val["input_ids"].shape[1] == SEQ_LEN
    assert torch.equal(orders[0], orders[1])
    test_items = dm.test_items()
    assert test_items == generate_split("test", 4, seed=0)

    write_jsonl(tmp_path / "train.jsonl", [{"messages": i["messages"]} for i in test_items])
    write_jsonl(tmp_path / "test.jsonl", [{"messages": i["messages"]} for i in test_items])
    source = {
        "kind": "jsonl",
        "train": str(tmp_path / "train.jsonl"),
        "test": str(tmp_path / "test.jsonl"),
    }
    dm = ChatDataModule(tok, source, SEQ_LEN, BLOCK, batch_size=2)
    assert [i["answer"] for i in dm.test_items()] == [i["answer"] for i in test_items]
    with pytest.raises(ValueError, match="validation"):
        dm.setup("fit")


def indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


def test_resumable_sampler_skips_consumed_batches_and_shards_by_rank():
    from src.data.datamodule import ResumableShuffleSampler

    full = indices(ResumableShuffleSampler(103, seed=3, batch_size=4))
    assert len(full) == 100 and len(set(full)) == 100
    resumed = ResumableShuffleSampler(103, seed=3, batch_size=4)
    resumed.resume_at(7)  # 7 batches of epoch 0 were consumed
    assert indices(resumed) == full[7 * 4 :]
    resumed.set_epoch(1)  # the next epoch starts at its beginning, in a new order
    next_epoch = indices(resumed)
    assert len(next_epoch) == 100 and next_epoch != full
    resumed.resume_at(25 + 2)  # epoch 1, batch 2
    assert resumed.epoch == 1 and indices(resumed) == next_epoch[2 * 4 :]
    shares = [indices(ResumableShuffleSampler(103, 3, 4, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 48 and not set(shares[0]) & set(shares[1])


def test_sampler_steps_are_whole_and_carry_their_supervised_tokens():
    """Each optimizer step (2 ranks x 3 accumulated batches of 4) is one contiguous stretch of
    the permutation, whole within an epoch, and every context of it carries the step's count
    over all ranks: here each context's count is its own index."""
    from src.data.datamodule import ResumableShuffleSampler

    world, accumulate, batch = 2, 3, 4
    samplers = [
        ResumableShuffleSampler(
            103, 3, batch, rank=r, world_size=world, accumulate=accumulate, num_supervised=sum
        )
        for r in range(world)
    ]
    shares = [list(sampler) for sampler in samplers]
    assert samplers[0].num_batches == 103 // (world * accumulate * batch) * accumulate == 12
    assert all(len(share) == 12 * batch for share in shares)
    window = batch * accumulate  # contexts per step and rank
    for step in range(4):
        contexts = [pair for share in shares for pair in share[step * window : (step + 1) * window]]
        counts = {count for _, count in contexts}
        assert counts == {sum(index for index, _ in contexts)}
    # A resumed sampler (at a step boundary) gives the same pairs from there on.
    samplers[1].resume_at(2 * accumulate)
    assert list(samplers[1]) == shares[1][2 * window :]
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        ResumableShuffleSampler(23, 3, batch, world_size=world, accumulate=accumulate)
