"""Train: AR-initialised model -> block-diffusion fine-tune -> HF export.

    python -m src.train experiment=tiny_ar          # tiny AR model from scratch (the AR-init)
    python -m src.train experiment=tiny             # block-diffusion fine-tune (embedded default)
    python -m src.train experiment=qwen7b --cfg job # show the composed config
    python -m src.train -m diffusion.block_size=16,32 trainer.max_steps=50

A run resumes from its own last checkpoint (`ckpt_path=last`) when one exists, so a
preempted or killed job started again in the same run directory continues where it stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from src.callbacks import PreemptionCheckpoint
from src.config import ConfigError, validate_train
from src.lit_module import DiffusionLM
from src.model import ensure_mask_token, load_tokenizer

log = logging.getLogger(__name__)


def build_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer (with the mask token): trained for scratch models, else the model's."""
    if model_cfg.get("tokenizer") is not None:
        tokenizer = instantiate(model_cfg.tokenizer)
        ensure_mask_token(tokenizer)
        return tokenizer
    return load_tokenizer(model_cfg.pretrained, gguf_file=model_cfg.get("gguf_file"))


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: the newest of this run's `last.ckpt` and the checkpoint written when
    SLURM signalled a preemption (`PreemptionCheckpoint`)."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    names = ("last.ckpt", PreemptionCheckpoint.FILENAME)
    candidates = [os.path.join(cfg.paths.ckpt_dir, name) for name in names]
    return max(filter(os.path.exists, candidates), key=os.path.getmtime, default=None)


def train(cfg: DictConfig) -> dict[str, Any]:
    validate_train(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    # Plain containers: checkpoints then hold no OmegaConf objects and load with weights_only.
    plain = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion", "optim")
    }
    module = DiffusionLM(tokenizer, **plain, seed=cfg.seed)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        log.info("checkpoints: %s", cfg.paths.ckpt_dir)
        log.info("HF export:   %s", cfg.paths.export_dir)
        log.info("metrics:     %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    # The value Hydra sweepers optimise.
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
