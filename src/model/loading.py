"""Loading the AR model a run starts from, thinly adapted for block diffusion.

No modeling code is forked: the block-diffusion forward goes through the standard HF forward
(4D attention mask + position ids), so any HF causal LM (Qwen2, Llama, ...) works. The only
change to the model is one vocabulary entry, the mask token.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from src.config import ConfigError
from src.model.export import describe
from src.model.released import model_config

log = logging.getLogger(__name__)

# The `model` config keys `build_model` takes.
BUILD_KEYS = (
    "pretrained",
    "config",
    "gguf_file",
    "attn_implementation",
    "dtype",
    "gradient_checkpointing",
)


def is_local_path(name: str) -> bool:
    """A name that can only mean a folder on disk (hub ids look like 'org/name')."""
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~"))


def check_model_source(model: DictConfig) -> None:
    """ConfigError unless the model config names a source that can exist: a from-scratch
    config, a hub id, or a local folder that is there (else: the command that makes it)."""
    pretrained = model.get("pretrained")
    if pretrained is None:
        if model.get("config") is None:
            raise ConfigError("model.pretrained and model.config are both null: set one")
        return
    if is_local_path(pretrained) and not os.path.exists(os.path.expanduser(pretrained)):
        producer = model.get("produced_by")
        hint = f": it is made by `{producer}`" if producer else ": set model.pretrained"
        raise ConfigError(f"model.pretrained={pretrained} does not exist{hint}")


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
    than the embedding matrix: Qwen2.5 has spare rows, SmolLM2 has none. `dtype` "auto": the
    dtype training keeps the parameters in, which the LightningModule resolves from its
    strategy (`src.training.module.parameter_dtype`); float32 here, outside a trainer.
    """
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    if pretrained is not None:
        try:
            model = _load_pretrained(pretrained, gguf_file, attn_implementation, torch_dtype)
        except Exception as err:  # a truncated or foreign weights file, an unreachable hub, ...
            raise ConfigError(
                f"cannot load model.pretrained={pretrained} ({describe(err)})"
            ) from None
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


def model_from_config(
    tokenizer: PreTrainedTokenizerBase, model: Mapping[str, Any]
) -> PreTrainedModel:
    """`build_model` from a `model` config (conf/model/), ignoring keys it does not take."""
    return build_model(tokenizer, **{k: model[k] for k in BUILD_KEYS if k in model})


def model_skeleton(tokenizer: PreTrainedTokenizerBase, model: Mapping[str, Any]) -> PreTrainedModel:
    """The model `model_from_config` builds, without its weights: parameters on the meta device
    (buffers real), from the architecture alone (a pretrained model's config.json; no weights
    are read). For loading weights from elsewhere, e.g. a ZeRO checkpoint (`assign=True`)."""
    from accelerate import init_empty_weights

    pretrained = model.get("pretrained")
    if pretrained is None:
        config = AutoConfig.for_model(**_scratch_config(model.get("config") or {}, tokenizer))
    else:
        kwargs = {"gguf_file": model["gguf_file"]} if model.get("gguf_file") else {}
        config = AutoConfig.from_pretrained(os.path.expanduser(pretrained), **kwargs)
        config.__dict__.pop("quantization_config", None)  # GGUF: loaded dequantised
    config._attn_implementation = model.get("attn_implementation", "sdpa")
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > skeleton.get_input_embeddings().num_embeddings:  # as `build_model`
        skeleton.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    return skeleton


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
        # A released Fast-dLLM v2 checkpoint loads into the stock class (src.model.released).
        return AutoModelForCausalLM.from_pretrained(
            path,
            config=model_config(path),
            trust_remote_code=False,
            attn_implementation=attn_implementation,
            dtype=dtype,
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
