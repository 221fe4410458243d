"""The decoding API every tool uses: an export and decode settings in, a `Decoder` out.

    decoder = load_decoder("artifacts/tiny", DecodeSettings.defaults())        # diffusion
    decoder = load_decoder("artifacts/tiny_ar", decode, decoder="ar")           # AR baseline
    decoder = make_decoder(Export(model, tokenizer, settings), decode)           # in memory
    result = decoder.generate([prompt_ids])   # GenerationResult

The trained block size and context are read from the export (`diffusion.json`); the decoder
name is `diffusion` (cached parallel decoding, SPEC section 3), `ar` (greedy AR decoding over a
KV cache, the baseline) or `verified` (the block-diffusion mode drafts, the causal mode
verifies: `ar`'s tokens, SPEC section 6), and None picks `ar` for an export trained with the AR
objective.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from src.config import ConfigError
from src.decoding.ar import generate_ar
from src.decoding.base import GenerationResult
from src.decoding.block import generate
from src.decoding.settings import DecodeSettings
from src.decoding.verified import generate_verified
from src.model.export import Export, load_export, read_settings

log = logging.getLogger(__name__)

DECODERS = ("diffusion", "ar", "verified")


@dataclass(frozen=True)
class Decoder:
    """Decodes token-id prompts with an export's model under `settings`."""

    export: Export
    settings: DecodeSettings
    name: ClassVar[str]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.export.tokenizer

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        raise NotImplementedError

    def replace(self, **changes: Any) -> Decoder:
        """The same decoder with some settings changed (e.g. a request's token budget)."""
        settings = check_settings(self.name, self.settings.replace(**changes))
        return dataclasses.replace(self, settings=settings)


@dataclass(frozen=True)
class DiffusionDecoder(Decoder):
    """Cached parallel decoding (`src.decoding.block.generate`)."""

    name: ClassVar[str] = "diffusion"
    generator: torch.Generator | None = None

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        trained = self.export.settings
        return generate(
            self.export.model,
            prompt_ids,
            mask_token_id=trained["mask_token_id"],
            stop_token_id=trained["stop_token_id"],
            generator=self.generator,
            vocab_limit=len(self.tokenizer),
            context=trained_context(trained),
            **self.settings.generate_kwargs(),
        )


@dataclass(frozen=True)
class ARDecoder(Decoder):
    """Greedy AR decoding (`generate_ar`); of the settings it uses `max_new_tokens`."""

    name: ClassVar[str] = "ar"

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        return generate_ar(
            self.export.model,
            prompt_ids,
            stop_token_id=self.export.settings["stop_token_id"],
            max_new_tokens=self.settings.max_new_tokens,
            vocab_limit=len(self.tokenizer),
        )


@dataclass(frozen=True)
class VerifiedDecoder(Decoder):
    """Self-verified decoding (`src.decoding.verified.generate_verified`): `ar`'s greedy
    tokens; of the settings it uses the block and sub-block sizes, the threshold, `draft` and
    `max_new_tokens`."""

    name: ClassVar[str] = "verified"

    @property
    def causal_mode_trained(self) -> bool:
        """Whether the export's causal mode was trained (the AR term, `diffusion.ar_weight`
        > 0): without it verification stays exact but accepts fewer drafts."""
        return (self.export.settings.get("ar_weight") or 0) > 0

    def generate(self, prompt_ids: list[list[int]]) -> GenerationResult:
        trained = self.export.settings
        s = self.settings
        return generate_verified(
            self.export.model,
            prompt_ids,
            mask_token_id=trained["mask_token_id"],
            stop_token_id=trained["stop_token_id"],
            block_size=s.block_size,
            sub_block_size=s.sub_block_size,
            threshold=s.threshold,
            max_new_tokens=s.max_new_tokens,
            draft=s.draft,
            context=trained_context(trained),
            vocab_limit=len(self.tokenizer),
        )


def trained_context(trained: Mapping[str, Any]) -> str:
    """The export's `diffusion.context` (absent: `block_causal`, the paper's)."""
    return trained.get("context") or "block_causal"


def note_untrained_causal_mode(decoder: Decoder, acceptance_length: float) -> None:
    """The one log line SPEC 6 asks for when `decoder=verified` runs on an export whose
    causal mode was not trained (the paper's recipe): exact all the same, but slower."""
    if isinstance(decoder, VerifiedDecoder) and not decoder.causal_mode_trained:
        log.warning(
            "decoder=verified: the causal mode of this export was not trained (diffusion."
            "ar_weight is 0 or absent): the tokens are still exactly its greedy ones, with "
            "%.2f tokens accepted per verification",
            acceptance_length,
        )


def check_decoder_name(decoder: str | None) -> None:
    """ConfigError unless `decoder` names a decoder (None: chosen from the export)."""
    if decoder is not None and decoder not in DECODERS:
        raise ConfigError(f"decoder={decoder!r}: choose one of {', '.join(DECODERS)}")


def decoder_name(decoder: str | None, trained: Mapping[str, Any], where: str = "") -> str:
    """The decoder to use for an export trained with `trained` (its diffusion.json)."""
    check_decoder_name(decoder)
    if decoder is None:
        decoder = "ar" if trained.get("objective") == "ar" else "diffusion"
    where = where or "the export"
    if decoder == "ar":
        return decoder
    if trained.get("objective") == "ar":
        raise ConfigError(
            f"{where} was trained with the AR objective, not block diffusion: "
            "decode it with decoder=ar"
        )
    if trained.get("token_shift") is False:
        # The decoder scores position j with the logit at j-1 and starts each block with the
        # previous block's last logit (SPEC section 3); an unshifted model would be misread.
        raise ConfigError(
            f"{where} was trained with diffusion.token_shift=false, which the "
            f"{decoder} decoder cannot decode: retrain with token_shift=true, or use decoder=ar"
        )
    if trained.get("mask_token_id") is None:
        raise ConfigError(f"{where} has no mask token, so it cannot diffuse: use decoder=ar")
    return decoder


def check_settings(decoder: str, settings: DecodeSettings) -> DecodeSettings:
    """ConfigError for settings `decoder` cannot decode with: `verified` is greedy, and its
    drafts come from SPEC 3's decoder without the (approximate) sub-block cache."""
    if decoder == "verified" and settings.temperature > 0:
        raise ConfigError(
            f"decoder=verified is greedy (decode.temperature={settings.temperature}): "
            "set decode.temperature=0, or sample with decoder=diffusion"
        )
    if decoder == "verified" and settings.use_sub_block_cache:
        raise ConfigError(
            "decoder=verified drafts without the sub-block cache: "
            "set decode.use_sub_block_cache=false"
        )
    return settings


def make_decoder(
    export: Export,
    decode: Mapping[str, Any] | DecodeSettings,
    *,
    decoder: str | None = None,
    generator: torch.Generator | None = None,
) -> Decoder:
    """A decoder for an export in memory; `decode` is a decode config or resolved settings."""
    name = decoder_name(decoder, export.settings)
    if not isinstance(decode, DecodeSettings):
        decode = DecodeSettings.resolve(decode, export.settings["block_size"])
    check_settings(name, decode)
    if name == "ar":
        return ARDecoder(export, decode)
    if name == "verified":
        return VerifiedDecoder(export, decode)
    return DiffusionDecoder(export, decode, generator)


def check_export(
    path: str, decode: Mapping[str, Any], decoder: str | None = None
) -> tuple[str, DecodeSettings]:
    """Every check of decoding `path` that needs no model: (decoder name, settings)."""
    trained = read_settings(path)
    name = decoder_name(decoder, trained, path)
    return name, check_settings(name, DecodeSettings.resolve(decode, trained["block_size"]))


def load_decoder_from_config(cfg: Mapping[str, Any]) -> Decoder:
    """`load_decoder` with an entry config's `ckpt`, `decode`, `decoder` and the rest of
    conf/export/ (`src.eval`, `src.generate`)."""
    return load_decoder(
        cfg["ckpt"],
        cfg["decode"],
        decoder=cfg["decoder"],
        device=cfg["device"],
        dtype=cfg["dtype"],
        attn_implementation=cfg["attn_implementation"],
        seed=cfg["seed"],
    )


def load_decoder(
    path: str,
    decode: Mapping[str, Any],
    *,
    decoder: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> Decoder:
    """Check, then load the export at `path` and wrap it; `seed` seeds sampling."""
    name, settings = check_export(path, decode, decoder)
    export = load_export(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    generator = torch.Generator(export.model.device).manual_seed(seed)
    return make_decoder(export, settings, decoder=name, generator=generator)
