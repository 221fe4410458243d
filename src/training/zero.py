"""DeepSpeed ZeRO helpers: the config a strategy hands to DeepSpeed, ZeRO-3-aware model
creation, gathering partitioned parameters, and an HF export from a (sharded) ZeRO checkpoint's
consolidated weights."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import HfDeepSpeedConfig

from src.config import instantiate
from src.model import save_export
from src.training.checks import is_deepspeed

# Prefixes between a ZeRO checkpoint's parameter names and the HF model's: Lightning's old
# module wrapper, then the `DiffusionLM.model` attribute.
_CHECKPOINT_PREFIXES = ("_forward_module.", "model.")


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The DeepSpeed config dict the run's strategy passes to `deepspeed.initialize`.

    The strategy's own config plus what Lightning's `DeepSpeedStrategy.setup` adds from the
    trainer and data config: micro-batch size, gradient accumulation, clipping, precision.
    """
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    if not is_deepspeed(cfg.trainer.strategy):
        raise ValueError(
            f"trainer.strategy is not DeepSpeed: choose strategy=deepspeed_zero2, "
            f"deepspeed_zero3 or deepspeed_zero3_offload (got {cfg.trainer.strategy})"
        )
    strategy: DeepSpeedStrategy = instantiate(cfg.trainer.strategy)
    config = copy.deepcopy(strategy.config)
    config["gradient_accumulation_steps"] = cfg.trainer.accumulate_grad_batches
    config.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    config.setdefault("gradient_clipping", cfg.trainer.gradient_clip_val or 0.0)
    _format_precision_config(
        config=config,
        precision=cfg.trainer.precision,
        loss_scale=strategy.loss_scale,
        loss_scale_window=strategy.loss_scale_window,
        min_loss_scale=strategy.min_loss_scale,
        initial_scale_power=strategy.initial_scale_power,
        hysteresis=strategy.hysteresis,
    )
    return config


def zero_stage(ds_config: dict[str, Any] | None) -> int:
    return (ds_config or {}).get("zero_optimization", {}).get("stage", 0)


def hf_deepspeed_config(strategy: object) -> HfDeepSpeedConfig | None:
    """What transformers must hold while a model is created under ZeRO-3, else None.

    Lightning creates the model inside `deepspeed.zero.Init`, which partitions every parameter
    as it is made. `from_pretrained` loads into those shards (gathering each one) only while an
    `HfDeepSpeedConfig` is alive; without it the parameters have shape [0] and loading fails
    with size mismatches. transformers keeps only a weak reference: hold the returned object
    for as long as the model lives.
    """
    if not isinstance(strategy, DeepSpeedStrategy) or zero_stage(strategy.config) != 3:
        return None
    return HfDeepSpeedConfig(strategy.config)


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether the parameters are ZeRO-3 shards (each rank holds a slice, `.data` is empty)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters on every rank inside the block (collective under ZeRO-3: all ranks
    must enter); a no-op for a model that is not partitioned."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def unpartitioned(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The model with full weights and no DeepSpeed hooks inside the block: the model itself
    when it is not partitioned; under ZeRO-3, a plain copy of its architecture whose tensors
    are the gathered parameters (no copy of the weights).

    Collective: every rank must enter. Forwards through the copy involve no other rank, so
    ranks may make different numbers of them. Through the partitioned model itself they may
    not: its first forward reaches the parameter coordinator's `reset_step`, which checks with
    a broadcast that every rank traced the same modules, and a rank that makes no forward
    leaves the others waiting there forever (also with DeepSpeed's hooks removed).
    """
    if not is_partitioned(model):
        yield model
        return
    with gathered_parameters(model):
        with torch.device("meta"):
            plain = type(model)(copy.deepcopy(model.config))
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors |= dict(model.named_buffers(remove_duplicate=False))
        for name, tensor in tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = plain.get_submodule(module_name)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(tensor.data, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"no gathered tensor for {left[:3]} of the plain model copy")
        try:
            yield plain.eval()
        finally:
            del plain, tensors  # the gathered tensors must be free when the block exits


def zero_checkpoint_state_dict(
    checkpoint_dir: str, tag: str | None = None, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Consolidated weights of a ZeRO (stage 1-3) checkpoint with HF parameter names, in `dtype`
    (default float32: the optimizer's master weights).

    Made one parameter at a time: DeepSpeed's lazy reader maps the checkpoint's fp32 partitions
    from disk, and each parameter is gathered from them and cast before the next, so host
    memory holds the result and one fp32 parameter (under ZeRO-3; DeepSpeed's ZeRO-2 reader
    concatenates the fp32 partitions first). Tied weights: one tensor under each name.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not os.path.isdir(checkpoint_dir):
        raise ValueError(
            f"{checkpoint_dir} is not a DeepSpeed checkpoint folder: pass the folder Lightning's "
            "DeepSpeedStrategy wrote, e.g. checkpoints/last.ckpt"
        )
    lazy = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag, lazy_mode=True)
    made: dict[int, torch.Tensor] = {}  # shared parameters are one lazy object
    state = {}
    for name, tensor in lazy.items():
        if id(tensor) not in made:
            full = tensor.contiguous()  # a ZeRO-3 parameter is gathered here
            cast = dtype is not None and full.is_floating_point()
            made[id(tensor)] = full.to(dtype) if cast else full
        state[_hf_name(name)] = made[id(tensor)]
    return state


def _hf_name(name: str) -> str:
    for prefix in _CHECKPOINT_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def export_zero_checkpoint(
    checkpoint_dir: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: dict[str, Any],
    path: str,
    *,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a ZeRO checkpoint's consolidated weights into `model` (same architecture, any
    device; best a skeleton on the meta device, `model_skeleton`, so no other copy of the
    weights exists) and write the HF export. `dtype`: e.g. torch.bfloat16 for the weights the
    bf16 run computed with (half the memory); default fp32 (the optimizer's master weights)."""
    state = zero_checkpoint_state_dict(checkpoint_dir, tag, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    save_export(model, tokenizer, settings, path)
    return model
