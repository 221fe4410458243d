"""HF-format export: `save_pretrained` of model and tokenizer plus the diffusion settings.

An export folder is what every downstream tool takes (`ckpt=<export dir>`): decoding must use
the block size the model was trained with, so the settings travel with the weights in
`diffusion.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SETTINGS_FILE = "diffusion.json"


@dataclass
class Export:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    settings: dict[str, Any]


def save_export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: dict[str, Any],
    path: str,
) -> None:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def read_settings(path: str) -> dict[str, Any]:
    """The diffusion settings of an export, with a one-line error when it is not one."""
    settings_file = os.path.join(path, SETTINGS_FILE)
    if not os.path.isfile(settings_file):
        raise ValueError(
            f"{path} is not an export of this pipeline (no {SETTINGS_FILE}): pass the export "
            "folder a training run printed, e.g. artifacts/tiny/export"
        )
    with open(settings_file) as f:
        return json.load(f)


def load_export(
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Export:
    """Model (eval mode, on `device`; "auto" picks CUDA when there is one), tokenizer, settings."""
    settings = read_settings(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        attn_implementation=attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Export(model.to(device).eval(), tokenizer, settings)
