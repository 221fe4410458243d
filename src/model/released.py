"""Checkpoints this pipeline did not write: the released Fast-dLLM v2 format (SPEC 4.2), plain HF
causal LMs (an AR baseline such as Qwen2.5-7B-Instruct), and hub ids of either.

A released checkpoint (`Efficient-Large-Model/Fast_dLLM_v2_7B`, `..._1.5B`) has no
`diffusion.json`: its `config.json` says `model_type: Fast_dLLM_Qwen`, `bd_size` (the block
size) and remote-code entry points (`auto_map` -> its own `modeling.py`). Its weights carry
Qwen2's names, so they load into the stock Qwen2 class from a Qwen2 config built from the
same fields; `auto_map` is dropped and remote code is never imported (`trust_remote_code`
stays false). The mask token is the tokenizer's `|<MASK>|` and the stop token the one ending
an assistant turn, both looked up, never hard-coded. The model was trained with the token
shift and the block-causal context of SPEC sections 2-3, so `src.decoding` decodes it as it is.

A plain HF causal LM with a chat template (no `diffusion.json`, no `bd_size`) reads as an
AR checkpoint: `decoder=ar` decodes it, the diffusion decoder refuses it (no mask token).

`read_settings` / `load_export` (src/model/export.py) and `model.pretrained`
(src/model/loading.py) call in here; a hub id is fetched with
`huggingface_hub.snapshot_download` (offline: the local cache).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from src.config import CONF_DIR, ConfigError
from src.model.tokenizer import MASK_TOKEN, mask_token_id_of, stop_token_of

RELEASED_FORMAT = "fast_dllm_v2"
HF_FORMAT = "hf_causal_lm"
# A released checkpoint's model_type -> the stock model type its weights load into.
RELEASED_MODEL_TYPES = {"Fast_dLLM_Qwen": "qwen2"}
# Keys of a released config.json that the stock config must not get: the remote-code entry
# points (a config with `auto_map` makes transformers ask for trust_remote_code) and the
# method's own fields (`conplemenrary_mask` is the release's spelling).
RELEASED_KEYS = ("architectures", "model_type", "auto_map", "bd_size", "conplemenrary_mask")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A folder a tokenizer loads from holds one of these (fast, SentencePiece, BPE, WordPiece).
# Without any, transformers may build a tokenizer of one token from the rest, which fails
# much later with a message about prompt ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer_files(folder: str, fix: str) -> None:
    """ConfigError naming `folder` and `fix` (what makes the files) unless a tokenizer's
    vocabulary file is there; checked before any model loads."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): {fix}"
        )


def checkpoint_folder(ckpt: str) -> str:
    """The local folder of `ckpt`: a folder as it is, a hub id ("org/name") that is not a
    folder here as its snapshot (downloaded once; offline: from the cache)."""
    path = os.path.expanduser(ckpt)
    if os.path.exists(path) or not _HUB_ID.fullmatch(ckpt):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ckpt)
    except Exception as err:  # offline and not cached, no such repository, no access, ...
        raise ConfigError(
            f"ckpt={ckpt} is no folder here, and no hub model of that id could be fetched "
            f"({type(err).__name__}): pass an export folder (e.g. artifacts/tiny) or a hub id "
            "(offline: one in the hub cache)"
        ) from None


def _config_json(name: str) -> dict[str, Any] | None:
    """config.json of a folder or a hub id; None when there is none to read."""
    path = os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.expanduser(name)) or not _HUB_ID.fullmatch(name):
            return None
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, "config.json")
        except Exception:  # unreachable: loading the model reports the real error
            return None
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg})") from None
    return config if isinstance(config, dict) else None


def model_config(name: str) -> PretrainedConfig | None:
    """The stock config the weights of a released checkpoint (folder or hub id) load into;
    None for any other checkpoint, whose own config.json transformers reads as usual."""
    config = _config_json(name)
    if config is None or config.get("model_type") not in RELEASED_MODEL_TYPES:
        return None
    fields = {k: v for k, v in config.items() if k not in RELEASED_KEYS}
    return AutoConfig.for_model(RELEASED_MODEL_TYPES[config["model_type"]], **fields)


def imported_settings(folder: str) -> dict[str, Any] | None:
    """What `diffusion.json` would say, for a released checkpoint or a plain HF causal LM in
    `folder`; None when the folder is neither (nor has a config.json)."""
    config = _config_json(folder)
    if config is None:
        return None
    model_type = config.get("model_type")
    released = model_type in RELEASED_MODEL_TYPES
    if not released and "bd_size" in config:
        known = ", ".join(RELEASED_MODEL_TYPES)
        raise ConfigError(
            f"{folder}/config.json has bd_size but model_type {model_type!r}: the released "
            f"Fast-dLLM v2 format this pipeline reads is model_type {known}"
        )
    if not released and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    check_tokenizer_files(folder, "download the checkpoint's tokenizer files again")
    try:
        # trust_remote_code=False: AutoTokenizer reads the model config first, and a released
        # one would otherwise ask (on stdin) to run its configuration.py.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:
        raise ConfigError(
            f"cannot load the tokenizer of {folder} ({type(err).__name__}): a checkpoint needs "
            "its tokenizer files beside the weights"
        ) from None
    stop_token, stop_token_id = stop_token_of(tokenizer)
    imported = {"format": RELEASED_FORMAT if released else HF_FORMAT, "model_type": model_type}
    if not released:
        return {
            "objective": "ar",
            # Unused by decoder=ar; what this pipeline's own AR exports record.
            "block_size": _default_block_size(),
            "mask_token": None,
            "mask_token_id": None,
            "stop_token": stop_token,
            "stop_token_id": stop_token_id,
            "imported": imported,
        }
    try:
        mask_token_id = mask_token_id_of(tokenizer)
    except ValueError:
        raise ConfigError(
            f"{folder} is a released Fast-dLLM v2 checkpoint (model_type {model_type}) whose "
            f"tokenizer lacks {MASK_TOKEN!r}: download the checkpoint's tokenizer files again"
        ) from None
    return {
        "objective": "block_diffusion",
        "block_size": config["bd_size"],
        "mask_token": MASK_TOKEN,
        "mask_token_id": mask_token_id,
        "stop_token": stop_token,
        "stop_token_id": stop_token_id,
        # SPEC 4.2: trained with the token shift and complementary views (its own flag).
        "token_shift": True,
        "complementary": bool(config.get("conplemenrary_mask", True)),
        "imported": imported | {"loaded_as": RELEASED_MODEL_TYPES[model_type]},
    }


def _default_block_size() -> int:
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF_DIR / "diffusion" / "block_diffusion.yaml").block_size
