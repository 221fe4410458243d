"""Decoding: cached parallel decoding of a block-diffusion LM (`block`, with its position-indexed
KV cache in `cache`), the AR baseline (`ar`), self-verified decoding (`verified`), the decode
settings (`settings`) and the one API every tool uses to get a decoder from an export
(`decoder`)."""

from src.decoding.ar import generate_ar
from src.decoding.base import GenerationResult
from src.decoding.block import generate
from src.decoding.chat import Chat, chat_prompt_ids
from src.decoding.decoder import (
    DECODERS,
    ARDecoder,
    Decoder,
    DiffusionDecoder,
    VerifiedDecoder,
    check_decoder_name,
    check_export,
    decoder_name,
    load_decoder,
    load_decoder_from_config,
    make_decoder,
    note_untrained_causal_mode,
)
from src.decoding.settings import DecodeSettings
from src.decoding.verified import generate_verified

__all__ = [
    "DECODERS",
    "ARDecoder",
    "Chat",
    "DecodeSettings",
    "Decoder",
    "DiffusionDecoder",
    "GenerationResult",
    "VerifiedDecoder",
    "chat_prompt_ids",
    "check_decoder_name",
    "check_export",
    "decoder_name",
    "generate",
    "generate_ar",
    "generate_verified",
    "load_decoder",
    "load_decoder_from_config",
    "make_decoder",
    "note_untrained_causal_mode",
]
