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

from src.config import ConfigError
from src.config.files import atomic_folder
from src.model.released import (
    check_tokenizer_files,
    checkpoint_folder,
    imported_settings,
    model_config,
)

SETTINGS_FILE = "diffusion.json"
# What makes an export again, for the errors about a broken one.
REEXPORT = (
    "re-export it: rerun the training run that wrote it (same hydra.run.dir: it resumes at its "
    "last step and only exports), or python -m src.zero_to_hf <checkpoint> <export dir>"
)


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
    """Write the export folder whole or not at all (`src.config.files.atomic_folder`): an
    export already at `path` stays loadable until the new one replaces it, and a write that
    fails (a full disk: one line with the bytes needed) leaves it as it was."""
    if os.path.isdir(path) and os.listdir(path) and not _is_export(path):
        raise ConfigError(
            f"{path} holds files that are not an export (no {SETTINGS_FILE} or config.json), "
            "which writing the export would replace: choose an empty or new folder"
        )
    with atomic_folder(path, what="the export", needed=weight_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True))


def _is_export(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (SETTINGS_FILE, "config.json"))


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the model's weights as `save_pretrained` writes them (tied ones once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# What decoding reads from diffusion.json; an export without them cannot be decoded.
REQUIRED_SETTINGS = ("objective", "block_size", "mask_token_id", "stop_token_id")


def read_settings(path: str) -> dict[str, Any]:
    """The diffusion settings of an export (or of a released checkpoint or HF causal LM, a
    folder or hub id: `src.model.released`), with a one-line error when it is none of them."""
    path = checkpoint_folder(path)
    settings_file = os.path.join(path, SETTINGS_FILE)
    if not os.path.isfile(settings_file):
        if (imported := imported_settings(path)) is not None:
            return imported
        raise ConfigError(
            f"{path} is not an export of this pipeline (no {SETTINGS_FILE}), nor a released "
            "Fast-dLLM v2 checkpoint or HF causal LM (no config.json of one): pass the export "
            "folder a training run printed, e.g. artifacts/tiny, or a checkpoint's hub id"
        )
    try:
        with open(settings_file) as f:
            settings = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{settings_file} is not valid JSON ({err.msg}): re-export the model"
        ) from None
    missing = [
        key for key in REQUIRED_SETTINGS if not isinstance(settings, dict) or key not in settings
    ]
    if missing:
        raise ConfigError(f"{settings_file} lacks {', '.join(missing)}: re-export the model")
    return settings


def local_device(cuda: bool | None = None) -> torch.device:
    """This process's device: `cuda:<LOCAL_RANK>` where there are GPUs (`cuda`: default,
    whether CUDA is available), one per process as torchrun, SLURM and Lightning start them;
    else the CPU. Chosen before any NCCL group exists, which binds to the current device."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto": this process's device (`local_device`); else the named one."""
    return local_device() if device == "auto" else torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": bfloat16 on CUDA, float32 on CPU; else the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_export(
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Export:
    """Model (eval mode, loaded straight onto `device`; "auto" picks CUDA when there is one),
    tokenizer, settings. `dtype` "auto" is bfloat16 on CUDA, float32 on CPU."""
    path = checkpoint_folder(path)
    settings = read_settings(path)
    check_tokenizer_files(path, REEXPORT)
    device = resolve_device(device)
    try:
        # A released checkpoint loads into the stock class its model_config names; remote
        # code never runs (its config.json has auto_map).
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=model_config(path),
            trust_remote_code=False,
            dtype=resolve_dtype(dtype, device),
            attn_implementation=attn_implementation,
            device_map=device,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # a truncated or foreign weights file, a missing tokenizer, ...
        raise ConfigError(f"cannot load the export {path} ({describe(err)}): {REEXPORT}") from None
    return Export(model.eval(), tokenizer, settings)


def describe(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}".rstrip(": ")
