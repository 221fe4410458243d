"""Logger factories of the `logger/` config group: they never block or crash a run for want of a
network."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """A WandbLogger, switched to offline mode when the W&B server cannot be reached.

    Online `wandb.init` without a network retries for a long time and then raises; a run
    must not die for its logger, so offline is chosen up front (sync later with `wandb sync`).
    """
    mode = os.environ.get("WANDB_MODE", kwargs.pop("mode", "online"))
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    if mode == "online" and not reachable(host):
        log.warning("W&B server %s unreachable: logging offline (wandb sync later)", host)
        mode = "offline"
    return WandbLogger(mode=mode, **kwargs)


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
