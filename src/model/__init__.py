"""Models: loading the AR-init (hub id, local folder, GGUF or from scratch), the tokenizer with
the mask token, and the HF export every downstream tool reads."""

from src.model.export import Export, load_export, read_settings, save_export
from src.model.loading import build_model, check_model_source, model_from_config, model_skeleton
from src.model.tokenizer import (
    MASK_TOKEN,
    build_tokenizer,
    ensure_mask_token,
    load_tokenizer,
    mask_token_id_of,
    stop_token_of,
    tokenizer_fingerprint,
)

__all__ = [
    "MASK_TOKEN",
    "Export",
    "build_model",
    "build_tokenizer",
    "check_model_source",
    "ensure_mask_token",
    "load_export",
    "load_tokenizer",
    "mask_token_id_of",
    "model_from_config",
    "model_skeleton",
    "read_settings",
    "save_export",
    "stop_token_of",
    "tokenizer_fingerprint",
]
