"""What every decoder shares: the result of a decode and the checks of its prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedModel


@dataclass
class GenerationResult:
    """What a decode produced and what it cost.

    `tokens[i]` is the continuation of prompt i: it ends at (and includes) the stop token when
    one was produced and holds at most `max_new_tokens` ids. `forwards` counts model forward
    calls (prefill included; a batched forward counts once). `unmasked_per_step[i]` lists, for
    each denoising step of sequence i, how many positions it unmasked (AR steps not included;
    for `decoder=verified`: how many positions a draft proposed). A decoder that has forwards
    of several kinds counts them in `forwards_by_kind` (they sum to `forwards`), and one that
    verifies lists in `accepted_per_iteration[i]` the tokens each verification of sequence i
    made final.
    """

    tokens: list[list[int]]
    forwards: int
    seconds: float
    unmasked_per_step: list[list[int]] = field(default_factory=list)
    forwards_by_kind: dict[str, int] = field(default_factory=dict)
    accepted_per_iteration: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_forward(self) -> float:
        return self.num_tokens / self.forwards if self.forwards else 0.0

    @property
    def denoising_steps(self) -> int:
        """Denoising steps summed over sequences."""
        return sum(len(s) for s in self.unmasked_per_step)

    @property
    def iterations(self) -> int:
        """Verifications summed over sequences."""
        return sum(len(a) for a in self.accepted_per_iteration)

    @property
    def acceptance_length(self) -> float:
        """Tokens made final per verification (>= 1; 0 without any)."""
        accepted = sum(sum(a) for a in self.accepted_per_iteration)
        return accepted / self.iterations if self.iterations else 0.0


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def validate_prompts(
    model: PreTrainedModel, prompt_ids: list[list[int]], max_new_tokens: int
) -> None:
    """ValueError (one line) for prompts no decoder may take: empty ones, ids outside the
    vocabulary, or a prompt that leaves no room for `max_new_tokens` in the model's context
    (every decoder alike: an error, not a silent cut)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token-id lists")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompt_ids)
    if context is not None and longest + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {context} tokens: lower decode.max_new_tokens or shorten the prompt"
        )
    vocab = vocab_size(model)
    if any(not 0 <= t < vocab for p in prompt_ids for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) (the model's vocabulary)")
