"""Loading the AR model and tokenizer that a run starts from, thinly adapted for block diffusion.

No modeling code is forked: the block-diffusion forward goes through the standard HF forward
(4D attention mask + position ids), so any HF causal LM (Qwen2, Llama, ...) works. The only
change to the model is one vocabulary entry, the mask token.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from src.data.tokenizer import MASK_TOKEN

log = logging.getLogger(__name__)


def package_path(package: str) -> str:
    """Folder of an installed package, found without importing it (an OmegaConf resolver)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: pip install {package}")
    return spec.submodule_search_locations[0]


def is_local_path(name: str) -> bool:
    """A name that can only mean a folder on disk (hub ids look like 'org/name')."""
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~"))


def load_tokenizer(pretrained: str, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local folder, with the mask token added when missing."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(pretrained), **kwargs)
    ensure_mask_token(tokenizer)
    return tokenizer


def ensure_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token: str = MASK_TOKEN) -> int:
    """Add the mask token as a special token when the vocabulary lacks it; return its id."""
    if mask_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [mask_token]})
    return tokenizer.convert_tokens_to_ids(mask_token)


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    gguf_file: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """An HF causal LM from `pretrained` (hub id or folder) or, from scratch, from `config`.

    Embeddings are resized only when the tokenizer (mask token included) has more entries
    than the embedding matrix: Qwen2.5 has spare rows, SmolLM2 has none.
    """
    torch_dtype = getattr(torch, dtype)
    if pretrained is not None:
        model = _load_pretrained(pretrained, gguf_file, attn_implementation, torch_dtype)
    else:
        model_config = AutoConfig.for_model(**_scratch_config(config or {}, tokenizer))
        model_config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype)
    # num_embeddings, not weight.shape: a ZeRO-3 shard has an empty weight.
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        log.info("resizing embeddings %d -> %d for the mask token", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _scratch_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {
        **config,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _load_pretrained(
    pretrained: str, gguf_file: str | None, attn_implementation: str, dtype: torch.dtype
) -> PreTrainedModel:
    path = os.path.expanduser(pretrained)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=dtype
        )
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain
    # model from its config and copy the dequantised weights, so export works downstream.
    gguf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    config = copy.deepcopy(gguf_model.config)
    config.__dict__.pop("quantization_config", None)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    return model
