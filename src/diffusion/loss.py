"""The block-diffusion training objective (SPEC section 2) and its AR counterpart.

Shapes: b = batch, v = noisy views, l = context length L, V = vocabulary.
Labels are *unshifted*: ``labels[i]`` is the token at position i when it is supervised
(an assistant token), else -100. The token shift is applied here, in one place.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from src.diffusion.masks import block_diffusion_attention, causal_attention

IGNORE_INDEX = -100


def sample_masked_positions(
    labels: Tensor,
    block_size: int,
    *,
    eps: float = 1e-3,
    complementary: bool = True,
    masking: str = "uniform",
    masking_tilt: float = 0.0,
    second_view: str = "complement",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Which supervised tokens are noised: bool `[b, v, l]`, v = 2 with `complementary`.

    Per block, t ~ U(0, 1) and p = (1 - eps) t + eps; each supervised token of the block is
    masked independently with probability p (SPEC section 2), or with `position_dependent`
    masking at position j of the block with p_j = clip(p (1 + g (2 (j + 0.5) / B - 1)), 0, 1),
    g = `masking_tilt` (SPEC 5.1: later positions more, as decoding leaves them masked
    longer). The second view (`complementary`) is the exact complement on supervised tokens
    (`second_view="complement"`: every supervised token masked once; under a tilt it tilts
    the other way), or a fresh draw with the same p_j (`"resample"`: tilted the same way).
    """
    b, l = labels.shape
    supervised = labels != IGNORE_INDEX  # [b, l]
    num_blocks = -(-l // block_size)
    t = torch.rand(b, num_blocks, generator=generator, device=labels.device)
    p = ((1 - eps) * t + eps).repeat_interleave(block_size, dim=1)[:, :l]  # [b, l]
    if masking == "position_dependent":
        j = torch.arange(l, device=labels.device) % block_size
        p = (p * (1 + masking_tilt * (2 * (j + 0.5) / block_size - 1))).clamp(0, 1)
    u = torch.rand(b, l, generator=generator, device=labels.device)
    first = supervised & (u < p)
    if not complementary:
        return first[:, None]
    if second_view == "resample":
        second = supervised & (torch.rand(b, l, generator=generator, device=labels.device) < p)
    else:
        second = supervised & ~first
    return torch.stack([first, second], dim=1)  # [b, 2, l]


def block_diffusion_logits(
    model: torch.nn.Module,
    noisy_ids: Tensor,
    clean_ids: Tensor,
    block_size: int,
    *,
    shared_clean_stream: bool = True,
    context: str = "block_causal",
) -> Tensor:
    """Logits at the noisy positions, unshifted: `[b, l, V]` or `[b, v, l, V]`.

    The model sees ``[x_t view 1, ..., x_t view v, x_0]`` (one clean stream shared by the
    views) with the same RoPE positions 0..l-1 in every part. With
    ``shared_clean_stream=False`` each view runs as its own ``[x_t; x_0]`` sequence instead
    (the official recipe's layout: 4L tokens for two views instead of 3L); both give the
    same logits, since a view never attends another view. `context`: what x_0 attends
    (`src.diffusion.masks`).
    """
    logits, _ = _logits(model, noisy_ids, clean_ids, block_size, shared_clean_stream, context)
    return logits


def _logits(
    model: torch.nn.Module,
    noisy_ids: Tensor,
    clean_ids: Tensor,
    block_size: int,
    shared_clean_stream: bool,
    context: str,
    with_clean: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`block_diffusion_logits`, and with `with_clean` the clean stream's logits `[b, l, V]`
    from the same forward (else None)."""
    single_view = noisy_ids.dim() == 2
    noisy = noisy_ids[:, None] if single_view else noisy_ids  # [b, v, l]
    b, v, l = noisy.shape
    if v > 1 and not shared_clean_stream:
        logits, clean = _logits(
            model, noisy.reshape(b * v, 1, l), clean_ids.repeat_interleave(v, dim=0),
            block_size, True, context, with_clean,
        )  # fmt: skip
        clean = None if clean is None else clean.view(b, v, l, -1)[:, 0]  # the views' x_0 agree
        return logits.view(b, v, l, -1), clean
    input_ids = torch.cat([noisy.reshape(b, v * l), clean_ids], dim=1)  # [b, (v+1)l]
    position_ids = torch.arange(l, device=clean_ids.device).repeat(v + 1).expand(b, -1)
    mask = _cached_attention(
        l,
        block_size,
        v,
        model.config._attn_implementation,
        model.dtype,
        clean_ids.device,
        context,
    )
    keep = (v + 1 if with_clean else v) * l
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=torch.arange(keep, device=clean_ids.device),
        use_cache=False,
    )
    logits = out.logits.view(b, -1, l, out.logits.shape[-1])  # [b, v (+1), l, V]
    clean = logits[:, v] if with_clean else None
    logits = logits[:, :v]
    return (logits[:, 0] if single_view else logits), clean


@functools.lru_cache(maxsize=8)
def _cached_attention(l, block_size, v, implementation, dtype, device, context):  # noqa: ANN001, ANN202
    # The mask depends only on the shapes: building it each step costs O((3L)^2) for nothing.
    return block_diffusion_attention(
        l, block_size, v, implementation=implementation, dtype=dtype, device=device,
        context=context,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _cached_causal(l, implementation, device):  # noqa: ANN001, ANN202
    return causal_attention(l, implementation=implementation, device=device)


def shifted_cross_entropy(
    logits: Tensor, targets: Tensor, selected: Tensor, normaliser: Tensor, *, token_shift: bool
) -> Tensor:
    """Summed CE over `selected` target positions divided by `normaliser`.

    With `token_shift`, the logit at position i-1 scores token i (the AR convention, so the
    pretrained next-token head is reused); without it, the logit at i scores token i.
    `logits` is `[..., l, V]`; `targets` and `selected` are `[..., l]`.
    """
    if token_shift:
        logits, targets, selected = logits[..., :-1, :], targets[..., 1:], selected[..., 1:]
    ce = F.cross_entropy(logits[selected].float(), targets[selected], reduction="sum")
    return ce / normaliser.clamp(min=1)


def distillation_kl(
    logits: Tensor,
    teacher_logits: Tensor,
    masked: Tensor,
    normaliser: Tensor,
    *,
    mask_token_id: int,
    temperature: float,
    token_shift: bool,
) -> Tensor:
    """tau^2 KL(softmax(z_T / tau) || softmax(z_S / tau)) summed over the masked supervised
    positions, over `normaliser` (SPEC 5.2).

    The teacher is causal on the clean sequence: its logit at i-1 is its next-token
    distribution for token i. The student's logit that scores token i is at i-1 (token
    shift) or at i. The mask token's column is left out of both softmaxes, and so are the
    columns only one of the two vocabularies has. `logits` `[b, v, l, V]`, `teacher_logits`
    `[b, l, V_T]`, `masked` `[b, v, l]`.
    """
    student = logits[..., :-1, :] if token_shift else logits[..., 1:, :]  # [b, v, l-1, V]
    teacher = teacher_logits[:, None, :-1, :].expand(-1, student.shape[1], -1, -1)
    selected = masked[..., 1:]  # position 0 is never scored by the teacher (nor supervised)
    vocab = min(student.shape[-1], teacher.shape[-1])
    keep = torch.arange(vocab, device=logits.device) != mask_token_id
    s = student[selected][:, :vocab][:, keep].float() / temperature  # [n, V']
    t = teacher[selected][:, :vocab][:, keep].float() / temperature
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    return temperature**2 * kl / normaliser.clamp(min=1)


def block_diffusion_loss(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    mask_token_id: int,
    block_size: int,
    eps: float = 1e-3,
    complementary: bool = True,
    token_shift: bool = True,
    shared_clean_stream: bool = True,
    masking: str = "uniform",
    masking_tilt: float = 0.0,
    masking_second_view: str = "complement",
    teacher: torch.nn.Module | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
    ar_weight: float = 0.0,
    context: str = "block_causal",
    generator: torch.Generator | None = None,
    normaliser: Tensor | None = None,
) -> Tensor:
    """Cross-entropy on the masked supervised tokens, over the number of supervised tokens.

    `normaliser` is that number: by default this batch's own; a micro-batch of a training step
    over several micro-batches and ranks passes the whole step's (its loss is then its share of
    the step's, see `DiffusionLM.training_step`). Every term below divides by it.

    No 1/t weighting and no extra AR term (SPEC section 2). The options of SPEC section 5:
    `masking`/`masking_tilt`/`masking_second_view` (`sample_masked_positions`), and with
    `distill_weight` > 0 the distillation term from the frozen AR `teacher`
    (`distillation_kl`), averaged over the same positions as the cross-entropy. Beyond the
    SPEC, `ar_weight` mu > 0 adds mu times the student's own next-token loss (`ar_loss`, a
    causal forward of x_0 with gradient): it keeps the AR-init's causal computation trained,
    which the converted model loses (experiments/recipe: arithmetic fails even one token per
    step, with every earlier token clean). With `context="causal"` (SPEC 6's one-cache
    variant) the clean stream attends causally, so its logits in the same forward are the AR
    next-token logits and the AR term needs no forward of its own.
    """
    masked = sample_masked_positions(
        labels,
        block_size,
        eps=eps,
        complementary=complementary,
        masking=masking,
        masking_tilt=masking_tilt,
        second_view=masking_second_view,
        generator=generator,
    )  # [b, v, l]
    clean = input_ids[:, None].expand_as(masked)  # [b, v, l]
    noisy = torch.where(masked, mask_token_id, clean)
    one_forward_ar = ar_weight > 0 and context == "causal"
    logits, clean_logits = _logits(
        model, noisy, input_ids, block_size, shared_clean_stream, context, one_forward_ar
    )  # [b, v, l, V], [b, l, V] | None
    num_supervised = (labels != IGNORE_INDEX).sum() if normaliser is None else normaliser
    loss = shifted_cross_entropy(logits, clean, masked, num_supervised, token_shift=token_shift)
    if distill_weight > 0:
        if teacher is None:
            raise ValueError("distill_weight > 0 needs the AR teacher")
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits  # [b, l, V_T]
        loss = loss + distill_weight * distillation_kl(
            logits,
            teacher_logits,
            masked,
            num_supervised,
            mask_token_id=mask_token_id,
            temperature=distill_temperature,
            token_shift=token_shift,
        )
    if ar_weight > 0:
        ar = (
            next_token_loss(clean_logits, input_ids, labels, normaliser)
            if one_forward_ar
            else ar_loss(model, input_ids, labels, normaliser=normaliser)
        )
        loss = loss + ar_weight * ar
    return loss


def ar_loss(
    model: torch.nn.Module, input_ids: Tensor, labels: Tensor, normaliser: Tensor | None = None
) -> Tensor:
    """Plain next-token loss on the supervised tokens (the `objective=ar` control), over
    `normaliser` (default: the batch's scored tokens; see `block_diffusion_loss`)."""
    mask = _cached_causal(input_ids.shape[1], model.config._attn_implementation, input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # [b, l, V]
    return next_token_loss(logits, input_ids, labels, normaliser)


def next_token_loss(
    logits: Tensor, input_ids: Tensor, labels: Tensor, normaliser: Tensor | None = None
) -> Tensor:
    """The next-token loss of causal logits `[b, l, V]` on the supervised tokens, over
    `normaliser` (default: the batch's scored tokens)."""
    supervised = labels != IGNORE_INDEX
    if normaliser is None:
        normaliser = supervised[:, 1:].sum()
    return shifted_cross_entropy(logits, input_ids, supervised, normaliser, token_shift=True)
