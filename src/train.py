"""Train: AR-initialised model -> block-diffusion fine-tune -> HF export.

    python -m src.train experiment=tiny_ar          # tiny AR model from scratch (the AR-init)
    python -m src.train experiment=tiny             # block-diffusion fine-tune (embedded default)
    python -m src.train experiment=qwen7b --cfg job # show the composed config
    python -m src.train -m diffusion.block_size=16,32 paths.export_dir='${paths.output_dir}/export'

A run resumes from its own last checkpoint (`ckpt_path=last`) when one exists, so a
preempted or killed job started again in the same run directory continues where it stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError, instantiate
from src.model import build_tokenizer
from src.model.export import SETTINGS_FILE
from src.training.checks import check_train, val_check_batches
from src.training.guards import RunDirLock, TrainingDiverged, is_first_process
from src.training.module import DiffusionLM
from src.training.resume import resume_path

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    check_train(cfg)
    # One run per run directory; every output folder writable before anything loads.
    lock = RunDirLock(cfg.paths.output_dir) if is_first_process() else None
    try:
        return _fit(cfg)
    finally:
        if lock is not None:
            lock.release()


def _fit(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = build_tokenizer(cfg.model)
    ckpt_path = resume_path(cfg, tokenizer)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    # Plain containers: checkpoints then hold no OmegaConf objects and load with weights_only.
    plain = {
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion", "optim")
    }
    module = DiffusionLM(tokenizer, **plain, seed=cfg.seed)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not loggers:  # `logger=none`: nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        val_check_interval=val_check_batches(cfg.trainer),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        log.info("checkpoints: %s", cfg.paths.ckpt_dir)
        exported = os.path.exists(os.path.join(cfg.paths.export_dir, SETTINGS_FILE))
        log.info("HF export:   %s", cfg.paths.export_dir if exported else "none written")
        log.info("metrics:     %s", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    except TrainingDiverged as err:
        raise SystemExit(f"error: {err}") from None
    # The value Hydra sweepers optimise.
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
