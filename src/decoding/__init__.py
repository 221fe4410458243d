"""Decoding: cached parallel decoding of a block-diffusion LM (`block`, with its position-indexed
KV cache in `cache`), the AR baseline (`ar`), the decode settings (`settings`) and the one API
every tool uses to get a decoder from an export (`decoder`)."""

from src.decoding.ar import generate_ar
from src.decoding.base import GenerationResult
from src.decoding.block import generate
from src.decoding.chat import Chat, chat_prompt_ids
from src.decoding.decoder import (
    DECODERS,
    ARDecoder,
    Decoder,
    DiffusionDecoder,
    check_decoder_name,
    check_export,
    decoder_name,
    load_decoder,
    load_decoder_from_config,
    make_decoder,
)
from src.decoding.settings import DecodeSettings

__all__ = [
    "DECODERS",
    "ARDecoder",
    "Chat",
    "DecodeSettings",
    "Decoder",
    "DiffusionDecoder",
    "GenerationResult",
    "chat_prompt_ids",
    "check_decoder_name",
    "check_export",
    "decoder_name",
    "generate",
    "generate_ar",
    "load_decoder",
    "load_decoder_from_config",
    "make_decoder",
]
