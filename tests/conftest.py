"""Shared test fixtures: real (tiny, random-init) HF models, never mocks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

TINY_CONFIGS = {
    "qwen2": Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "llama": LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}


def tiny_model(
    arch: str = "qwen2", vocab_size: int = 64, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    config = copy.deepcopy(TINY_CONFIGS[arch])  # _from_config mutates and shares its config
    config.vocab_size = vocab_size
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=["qwen2", "llama"])
def arch(request) -> str:
    return request.param
