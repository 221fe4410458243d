"""Lightning callbacks of the pipeline (each is listed in conf/callbacks/)."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from src.export import save_export

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """At the end of fit, write the HF export (model, tokenizer, diffusion.json) to `dirpath`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_export(pl_module.model, pl_module.tokenizer, pl_module.export_settings(), self.dirpath)
        log.info("HF export written to %s", self.dirpath)
