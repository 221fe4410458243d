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
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.model import build_tokenizer
from src.training.checks import check_train
from src.training.module import DiffusionLM
from src.training.resume import resume_path

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    check_train(cfg)
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
