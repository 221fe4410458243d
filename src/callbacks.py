"""Lightning callbacks of the pipeline (each is listed in conf/callbacks/)."""

from __future__ import annotations

import logging

import lightning as L

from src.distributed import gathered_parameters
from src.export import save_export

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    """At the end of fit, write the HF export (model, tokenizer, diffusion.json) to `dirpath`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank enters: gathering ZeRO-3 shards is collective (a no-op otherwise).
        with gathered_parameters(pl_module.model):
            if trainer.is_global_zero:
                settings = pl_module.export_settings()
                save_export(pl_module.model, pl_module.tokenizer, settings, self.dirpath)
                log.info("HF export written to %s", self.dirpath)
