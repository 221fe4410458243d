"""The block-diffusion masks and loss against brute-force and reference constructions."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from src.diffusion import (
    IGNORE_INDEX,
    ar_loss,
    block_diffusion_logits,
    block_diffusion_loss,
    block_diffusion_mask,
    sample_masked_positions,
)
from src.diffusion.masks import additive_mask, block_causal_allowed
from tests.conftest import tiny_model

VOCAB = 64
MASK_ID = VOCAB - 1


def brute_force_mask(
    seq_len: int, block_size: int, num_views: int, context: str = "block_causal"
) -> torch.Tensor:
    """SPEC section 2's table, cell by cell (SPEC 6's `context="causal"`: x_0 causal)."""
    n = (num_views + 1) * seq_len
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q, k in itertools.product(range(n), range(n)):
        q_part, qi = divmod(q, seq_len)
        k_part, ki = divmod(k, seq_len)
        qb, kb = qi // block_size, ki // block_size
        q_clean, k_clean = q_part == num_views, k_part == num_views
        if not q_clean and not k_clean:
            mask[q, k] = q_part == k_part and qb == kb
        elif not q_clean and k_clean:
            mask[q, k] = kb < qb
        elif q_clean and k_clean:
            mask[q, k] = ki <= qi if context == "causal" else kb <= qb
    return mask


@pytest.mark.parametrize("context", ["block_causal", "causal"])
@pytest.mark.parametrize(
    "seq_len,block_size,num_views", [(8, 4, 1), (12, 4, 2), (10, 3, 1), (6, 6, 3)]
)
def test_mask_matches_brute_force(seq_len, block_size, num_views, context):
    mask = block_diffusion_mask(seq_len, block_size, num_views, context)
    assert mask.shape == ((num_views + 1) * seq_len,) * 2
    assert torch.equal(mask, brute_force_mask(seq_len, block_size, num_views, context))


def block_causal_reference_logits(model, noisy, clean, block_size):
    """Per block b, a plain forward of [x_0 blocks < b ; x_t block b] under block-causal attention."""
    l = clean.shape[1]
    out = []
    for start in range(0, l, block_size):
        ids = torch.cat([clean[:, :start], noisy[:, start : start + block_size]], dim=1)
        pos = torch.arange(ids.shape[1])
        allowed = block_causal_allowed(pos[:, None], pos[None, :], block_size)
        mask = additive_mask(allowed, model.dtype)[None]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos[None]).logits
        out.append(logits[:, start:])
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_logits_match_separate_block_causal_forwards(arch):
    model = tiny_model(arch, VOCAB)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, MASK_ID, (2, 24), generator=g)
    noisy = torch.where(torch.rand(2, 2, 24, generator=g) < 0.5, MASK_ID, clean[:, None])
    logits = block_diffusion_logits(model, noisy, clean, block_size=8)  # [b, v, l, V]
    assert logits.shape == (2, 2, 24, VOCAB)
    for view in range(2):
        ref = block_causal_reference_logits(model, noisy[:, view], clean, 8)
        torch.testing.assert_close(logits[:, view], ref, atol=1e-5, rtol=1e-5)
    single = block_diffusion_logits(model, noisy[:, 0], clean, block_size=8)
    torch.testing.assert_close(single, logits[:, 0], atol=1e-5, rtol=1e-5)


def test_complementary_views_cover_each_supervised_token_once():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (4, 64), generator=g)
    labels[:, :10] = IGNORE_INDEX  # prompt
    labels[:, -7:] = IGNORE_INDEX  # padding
    masked = sample_masked_positions(labels, 16, complementary=True, generator=g)
    assert masked.shape == (4, 2, 64)
    supervised = labels != IGNORE_INDEX
    assert torch.equal(masked.sum(1), supervised.long())
    assert not masked[:, :, :10].any() and not masked[:, :, -7:].any()
    single = sample_masked_positions(labels, 16, complementary=False, generator=g)
    assert single.shape == (4, 1, 64) and not (single[:, 0] & ~supervised).any()


def test_masking_rate_is_drawn_per_block():
    g = torch.Generator().manual_seed(2)
    labels = torch.zeros(2000, 32, dtype=torch.long)
    masked = sample_masked_positions(labels, 8, eps=1e-3, complementary=False, generator=g)[:, 0]
    rate_per_block = masked.view(2000, 4, 8).float().mean(-1)  # [b, blocks]
    # t ~ U(0,1) per block: the mean rate is ~0.5 and the per-block rates spread over [0, 1].
    assert abs(rate_per_block.mean().item() - 0.5) < 0.02
    assert (rate_per_block == 0).any() and (rate_per_block == 1).any()
    assert rate_per_block.std() > 0.3


def manual_block_diffusion_loss(model, input_ids, labels, block_size, generator_seed):
    """The loss written out directly from SPEC section 2, through the two-sequence layout."""
    g = torch.Generator().manual_seed(generator_seed)
    masked = sample_masked_positions(labels, block_size, generator=g)  # [b, 2, l]
    total = 0.0
    for view in range(masked.shape[1]):
        noisy = torch.where(masked[:, view], MASK_ID, input_ids)
        logits = block_diffusion_logits(model, noisy, input_ids, block_size)
        for b, i in zip(*torch.nonzero(masked[:, view], as_tuple=True), strict=True):
            if i == 0:
                continue  # no logit precedes position 0
            total = total + F.cross_entropy(logits[b, i - 1], input_ids[b, i], reduction="sum")
    return total / (labels != IGNORE_INDEX).sum()


def sft_batch(seed=0, b=2, l=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (b, l), generator=g)
    labels = ids.clone()
    labels[:, :9] = IGNORE_INDEX  # prompt
    ids[:, -5:] = MASK_ID  # padding with mask ids
    labels[:, -5:] = IGNORE_INDEX
    return ids, labels


def test_shared_stream_loss_equals_two_sequence_loss(arch):
    model = tiny_model(arch, VOCAB)
    ids, labels = sft_batch()
    losses = {}
    for shared in (True, False):
        g = torch.Generator().manual_seed(3)
        losses[shared] = block_diffusion_loss(
            model,
            ids,
            labels,
            mask_token_id=MASK_ID,
            block_size=8,
            shared_clean_stream=shared,
            generator=g,
        )
    assert abs(losses[True].item() - losses[False].item()) < 1e-5
    manual = manual_block_diffusion_loss(model, ids, labels, 8, generator_seed=3)
    assert abs(losses[True].item() - manual.item()) < 1e-5


def poisoned_loss(poison_targets: torch.Tensor) -> torch.Tensor:
    """Loss with NaN logits wherever the logit scores a target in `poison_targets` `[b, l]`."""
    model = tiny_model("qwen2", VOCAB)
    ids, labels = sft_batch()
    scorer = torch.zeros_like(poison_targets)
    scorer[:, :-1] = poison_targets[:, 1:]  # token shift: the logit at i-1 scores token i

    def poison(module, inputs, logits):  # logits [b, v*l, V]
        return logits.masked_fill(
            scorer.repeat(1, logits.shape[1] // scorer.shape[1])[..., None], float("nan")
        )

    model.lm_head.register_forward_hook(poison)
    g = torch.Generator().manual_seed(4)
    return block_diffusion_loss(
        model, ids, labels, mask_token_id=MASK_ID, block_size=8, generator=g
    )


def test_prompt_and_padding_never_carry_loss():
    ids, labels = sft_batch()
    assert torch.isfinite(poisoned_loss(labels == IGNORE_INDEX))
    # The same probe on supervised targets does reach the loss: the test can fail.
    assert torch.isnan(poisoned_loss(labels != IGNORE_INDEX))


def test_ar_objective_equals_hf_causal_lm_loss(arch):
    model = tiny_model(arch, VOCAB)
    ids, labels = sft_batch()
    ours = ar_loss(model, ids, labels)
    hf = model(input_ids=ids, labels=labels).loss
    assert abs(ours.item() - hf.item()) < 1e-5


def test_token_shift_switch_changes_which_logit_scores_a_token():
    model = tiny_model("qwen2", VOCAB)
    ids, labels = sft_batch()
    kwargs = dict(mask_token_id=MASK_ID, block_size=8)
    shifted = block_diffusion_loss(
        model, ids, labels, generator=torch.Generator().manual_seed(5), **kwargs
    )
    unshifted = block_diffusion_loss(
        model, ids, labels, token_shift=False, generator=torch.Generator().manual_seed(5), **kwargs
    )
    assert shifted.item() != pytest.approx(unshifted.item())


@pytest.mark.slow
@torch.no_grad()
def test_flex_attention_equals_sdpa():
    sdpa = tiny_model("qwen2", VOCAB, "sdpa")
    flex = tiny_model("qwen2", VOCAB, "flex_attention")
    ids, _ = sft_batch(l=32)
    noisy = torch.where(torch.rand(2, 2, 32) < 0.5, MASK_ID, ids[:, None])
    a = block_diffusion_logits(sdpa, noisy, ids, 8)
    b = block_diffusion_logits(flex, noisy, ids, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def reference_masks(labels, block_size, seed, *, tilt, second_view, eps=1e-3):
    """SPEC 5.1 written out position by position, from the same random draws."""
    g = torch.Generator().manual_seed(seed)
    b, l = labels.shape
    t = torch.rand(b, -(-l // block_size), generator=g)
    u = torch.rand(b, l, generator=g)
    fresh = torch.rand(b, l, generator=g) if second_view == "resample" else None
    first = torch.zeros(b, l, dtype=torch.bool)
    second = torch.zeros(b, l, dtype=torch.bool)
    for row in range(b):
        for i in range(l):
            if labels[row, i] == IGNORE_INDEX:
                continue
            j = i % block_size
            p = (1 - eps) * t[row, i // block_size].item() + eps
            p_j = min(1.0, max(0.0, p * (1 + tilt * (2 * (j + 0.5) / block_size - 1))))
            first[row, i] = u[row, i].item() < p_j
            second[row, i] = fresh[row, i].item() < p_j if fresh is not None else not first[row, i]
    return torch.stack([first, second], dim=1)


@pytest.mark.parametrize("tilt", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("second_view", ["complement", "resample"])
def test_position_dependent_masking_is_the_spec_rule(tilt, second_view):
    ids, labels = sft_batch(b=3, l=40)
    masked = sample_masked_positions(
        labels,
        8,
        masking="position_dependent",
        masking_tilt=tilt,
        second_view=second_view,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(masked, reference_masks(labels, 8, 7, tilt=tilt, second_view=second_view))
    if second_view == "complement":  # every supervised token masked exactly once
        assert torch.equal(masked.sum(1), (labels != IGNORE_INDEX).long())


def test_a_tilt_masks_later_block_positions_more():
    labels = torch.zeros(4000, 16, dtype=torch.long)
    g = torch.Generator().manual_seed(8)
    masked = sample_masked_positions(
        labels, 16, masking="position_dependent", masking_tilt=1.0, generator=g
    )
    rate = masked.float().mean(0)  # [2, 16]
    assert (rate[0].diff() > 0).float().mean() > 0.8  # rises along the block
    assert rate[0, -1] > 2 * rate[0, 0] and abs(rate[0].mean().item() - 0.5) < 0.05
    assert rate[1, 0] > rate[1, -1]  # the complement tilts the other way
    uniform = sample_masked_positions(labels, 16, generator=torch.Generator().manual_seed(8))
    untilted = sample_masked_positions(
        labels, 16, masking="position_dependent", generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(uniform, untilted)  # g = 0 is the paper


def manual_recipe_loss(model, teacher, ids, labels, masked, *, weight, tau, token_shift, mu):
    """CE + lambda tau^2 KL, written out from SPEC sections 2 and 5.2 position by position
    through separate [x_t; x_0] sequences and the teacher's causal forward on x_0; plus mu
    times the student's next-token CE of every supervised token after the first position."""
    keep = [v for v in range(VOCAB) if v != MASK_ID]
    teacher_logits = teacher(input_ids=ids).logits  # causal
    student_ar = model(input_ids=ids).logits  # causal
    ar = (
        sum(
            F.cross_entropy(student_ar[b, i - 1], ids[b, i], reduction="sum")
            for b, i in zip(*torch.nonzero(labels != IGNORE_INDEX, as_tuple=True), strict=True)
            if i > 0
        )
        / (labels[:, 1:] != IGNORE_INDEX).sum()
    )
    ce = kl = 0.0
    for view in range(masked.shape[1]):
        noisy = torch.where(masked[:, view], MASK_ID, ids)
        logits = block_diffusion_logits(model, noisy, ids, 8, shared_clean_stream=False)
        for b, i in zip(*torch.nonzero(masked[:, view], as_tuple=True), strict=True):
            if i == 0:
                continue
            scorer = logits[b, i - 1] if token_shift else logits[b, i]
            ce = ce + F.cross_entropy(scorer, ids[b, i], reduction="sum")
            p_t = (teacher_logits[b, i - 1, keep] / tau).softmax(-1)
            log_q = (scorer[keep] / tau).log_softmax(-1)
            kl = kl + (p_t * (p_t.log() - log_q)).sum()
    return (ce + weight * tau**2 * kl) / (labels != IGNORE_INDEX).sum() + mu * ar


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_distillation_and_ar_term_are_the_written_formula(arch, shared, token_shift, mu):
    model, teacher = tiny_model(arch, VOCAB, seed=0), tiny_model(arch, VOCAB, seed=1)
    ids, labels = sft_batch()
    options = dict(masking="position_dependent", masking_tilt=0.5, distill_temperature=2.0)
    loss = block_diffusion_loss(
        model,
        ids,
        labels,
        mask_token_id=MASK_ID,
        block_size=8,
        token_shift=token_shift,
        shared_clean_stream=shared,
        teacher=teacher,
        distill_weight=0.7,
        ar_weight=mu,
        generator=torch.Generator().manual_seed(9),
        **options,
    )
    masked = sample_masked_positions(
        labels, 8, masking="position_dependent", masking_tilt=0.5,
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    manual = manual_recipe_loss(
        model, teacher, ids, labels, masked, weight=0.7, tau=2.0, token_shift=token_shift, mu=mu
    )
    assert loss.item() == pytest.approx(manual.item(), abs=1e-4)
    plain = block_diffusion_loss(
        model, ids, labels, mask_token_id=MASK_ID, block_size=8, token_shift=token_shift,
        generator=torch.Generator().manual_seed(9), masking="position_dependent", masking_tilt=0.5,
    )  # fmt: skip
    assert loss.item() > plain.item()  # the KL term is there (and positive)


@pytest.mark.slow
@torch.no_grad()  # FlexAttention has no backward on CPU
def test_recipe_options_with_flex_attention():
    sdpa = tiny_model("qwen2", VOCAB, "sdpa")
    flex = tiny_model("qwen2", VOCAB, "flex_attention")
    teacher = tiny_model("qwen2", VOCAB, seed=1)
    ids, labels = sft_batch()
    options = dict(
        mask_token_id=MASK_ID, block_size=8, masking="position_dependent", masking_tilt=1.0,
        masking_second_view="resample", teacher=teacher, distill_weight=0.5, ar_weight=0.5,
    )  # fmt: skip
    losses = [
        block_diffusion_loss(
            model, ids, labels, generator=torch.Generator().manual_seed(10), **options
        )
        for model in (sdpa, flex)
    ]
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-4)


@pytest.mark.parametrize("shared", [True, False])
def test_one_cache_ar_term_is_the_two_forward_loss(arch, shared):
    """SPEC 6's one-cache variant: with a causal clean stream, the AR term read off the clean
    stream's logits equals the AR loss of a separate causal forward of x_0."""
    model = tiny_model(arch, VOCAB)
    ids, labels = sft_batch()
    kw = dict(mask_token_id=MASK_ID, block_size=8, shared_clean_stream=shared, context="causal")
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    one = block_diffusion_loss(
        model, ids, labels, ar_weight=0.4, generator=torch.Generator().manual_seed(5), **kw
    )
    assert len(forwards) == 1  # no forward of its own for the AR term
    diffusion = block_diffusion_loss(
        model, ids, labels, generator=torch.Generator().manual_seed(5), **kw
    )
    two = diffusion + 0.4 * ar_loss(model, ids, labels)
    assert one.item() == pytest.approx(two.item(), abs=1e-5)
    # The paper's block-causal clean stream is no AR forward: its logits would give another loss.
    paper = block_diffusion_logits(model, ids, ids, 8, context="block_causal")
    causal = block_diffusion_logits(model, ids, ids, 8, context="causal")
    assert not torch.allclose(paper, causal)
