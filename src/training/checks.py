"""Every compose-time check of a training run: each is one line that names the key to fix,
raised before anything is loaded. The rules live with what they configure."""

from __future__ import annotations

import torch
from hydra.utils import get_class
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.config.files import check_writable
from src.config.resolvers import GPU_ACCELERATORS
from src.data.sft import check_lengths
from src.decoding import DecodeSettings
from src.diffusion import check_diffusion
from src.model import build_tokenizer, check_model_source, tokenizer_fingerprint


def is_deepspeed(strategy: DictConfig | str | None) -> bool:
    """Whether a `trainer.strategy` config selects Lightning's DeepSpeedStrategy."""
    if isinstance(strategy, str):
        return strategy.startswith("deepspeed")
    if strategy is None or "_target_" not in strategy:
        return False
    return issubclass(get_class(strategy._target_), DeepSpeedStrategy)


def check_strategy(trainer: DictConfig) -> None:
    """DeepSpeed runs on CUDA GPUs and on CPU ranks (`src.training.strategy`); asked for GPUs
    where there are none, Lightning would fail only after loading everything."""
    if not is_deepspeed(trainer.strategy):
        return
    if trainer.accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(
            f"a DeepSpeed strategy with trainer.accelerator={trainer.accelerator} needs CUDA "
            "GPUs, and none is available: pass trainer.accelerator=cpu (with "
            "trainer.precision=32-true) to run it on CPU ranks"
        )


# Keys whose values Lightning or the data code would reject only after loading everything
# (or with a TypeError naming no key): the type each must have, and its least value.
NUMBERS = {
    "seed": (int, None),
    "trainer.max_steps": (int, -1),
    "trainer.max_epochs": ((int, type(None)), -1),
    "trainer.devices": (int, 1),
    "trainer.num_nodes": (int, 1),
    "trainer.accumulate_grad_batches": (int, 1),
    "trainer.limit_val_batches": ((int, float), 0),
    "trainer.gradient_clip_val": ((int, float, type(None)), 0),
    "data.batch_size": (int, 1),
    "data.seq_len": (int, 1),
    "optim.lr": ((int, float), 0),
    "optim.warmup_steps": (int, 0),
}


def check_types(cfg: DictConfig) -> None:
    """One line naming the key of a value that is missing (`???`) or of the wrong type."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        keys = sorted(missing)
        raise ConfigError(f"{', '.join(keys)} must be set: pass e.g. {keys[0]}=<value>")
    for key, (kind, least) in NUMBERS.items():
        value = OmegaConf.select(cfg, key)
        if key == "trainer.devices" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{key}={value!r} must be a number")
        if least is not None and value is not None and value < least:
            raise ConfigError(f"{key}={value} must be >= {least}")
    if cfg.trainer.max_steps == 0:
        raise ConfigError("trainer.max_steps=0 trains nothing: pass a positive number of steps")
    epochs = cfg.trainer.get("max_epochs")
    # Lightning reads -1 as "no step limit": without an epoch budget training (and the LR
    # schedule, which spans the run) would never end.
    if cfg.trainer.max_steps == -1 and (epochs is None or epochs == -1):
        raise ConfigError(
            f"trainer.max_steps=-1 without an epoch budget (trainer.max_epochs={epochs}) never "
            "stops: pass a positive trainer.max_steps, or trainer.max_epochs=<N>"
        )


def check_val_check_interval(trainer: DictConfig) -> None:
    """`trainer.val_check_interval` is a number of optimizer steps or a fraction of an epoch."""
    interval = trainer.val_check_interval
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval={interval!r} must be a number of optimizer steps (an "
            "int >= 1) or a fraction of an epoch (a float in (0, 1])"
        )
    if isinstance(interval, float) and interval > 1:
        raise ConfigError(
            f"trainer.val_check_interval={interval} is a float above 1: pass an int for a "
            "number of optimizer steps, or a fraction of an epoch in (0, 1]"
        )


def val_check_batches(trainer: DictConfig) -> int | float:
    """`trainer.val_check_interval` as Lightning counts it: in training batches (micro-batches).

    Every interval of a run's config counts optimizer steps, as the checkpoint, logging and
    decode-eval intervals do in Lightning; its `val_check_interval` alone counts batches, so
    with `accumulate_grad_batches: 4` a 500 there would validate every 125 steps. A float is a
    fraction of an epoch, Lightning's own meaning.
    """
    interval = trainer.val_check_interval
    if isinstance(interval, float):
        return interval
    return interval * trainer.accumulate_grad_batches


def check_distillation(cfg: DictConfig) -> None:
    """Distillation (SPEC 5.2) needs an AR teacher that speaks the student's tokenizer, and
    (for now) a strategy that does not partition parameters: under ZeRO-3 the teacher would
    have to be partitioned like the student."""
    diffusion = cfg.diffusion
    if diffusion.get("distill_weight", 0.0) <= 0:
        return
    teacher = diffusion.get("distill_teacher") or cfg.model.get("pretrained")
    if teacher is None:
        raise ConfigError(
            "diffusion.distill_weight > 0 needs an AR teacher: model.pretrained (the AR-init) "
            "or diffusion.distill_teacher"
        )
    strategy = cfg.trainer.strategy
    stage = (
        OmegaConf.select(strategy, "config.zero_optimization.stage")
        if is_deepspeed(strategy)
        else 0
    )
    if stage == 3:
        raise ConfigError(
            "distillation under ZeRO-3 is not supported yet (its teacher is not partitioned): "
            "use strategy=deepspeed_zero2, or diffusion.distill_weight=0"
        )
    if diffusion.get("distill_teacher"):
        check_model_source(OmegaConf.create({"pretrained": teacher}))
        teacher_model = {
            **OmegaConf.to_container(cfg.model),
            "pretrained": teacher,
            "tokenizer": None,
        }
        student = tokenizer_fingerprint(build_tokenizer(cfg.model))
        if tokenizer_fingerprint(build_tokenizer(OmegaConf.create(teacher_model))) != student:
            raise ConfigError(
                f"diffusion.distill_teacher={teacher} has another tokenizer than the student: "
                "distil from a model of the same tokenizer"
            )


def check_decode_eval(cfg: DictConfig) -> None:
    """The decode evaluation during training must be able to decode the run's model."""
    decode_eval = (cfg.get("callbacks") or {}).get("decode_eval")
    if decode_eval is None or decode_eval.get("decoder") == "ar":
        return
    if cfg.diffusion.objective != "ar" and cfg.diffusion.get("token_shift") is False:
        raise ConfigError(
            "diffusion.token_shift=false cannot be decoded by the block decoder (it reads the "
            "logit before each position): drop callbacks=decode_eval, or keep token_shift=true"
        )


def check_train(cfg: DictConfig) -> None:
    """All compose-time checks of a training run."""
    check_types(cfg)
    check_val_check_interval(cfg.trainer)
    check_writable(
        {
            key: OmegaConf.select(cfg, key)
            for key in ("paths.output_dir", "paths.ckpt_dir", "paths.export_dir")
        }
    )
    check_diffusion(cfg.diffusion)
    check_lengths(cfg.data.seq_len, cfg.diffusion.block_size)
    DecodeSettings.resolve(cfg.decode, cfg.diffusion.block_size)
    check_model_source(cfg.model)
    check_strategy(cfg.trainer)
    check_distillation(cfg)
    check_decode_eval(cfg)
