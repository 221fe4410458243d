"""Lightning's DeepSpeedStrategy, also on CPU ranks (conf/strategy/deepspeed/base.yaml).

Lightning refuses DeepSpeed on anything but CUDA in `setup_environment`, although DeepSpeed
itself runs ZeRO 0-3 on CPU (its CPU accelerator, gloo). Lifting that refusal is what lets the
cluster path (engine set-up, optimizer and scheduler hand-off, sharded checkpoints, resume)
run end to end on a CPU machine. On CUDA nothing differs from the stock strategy.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

log = logging.getLogger(__name__)


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """`lightning.pytorch.strategies.DeepSpeedStrategy` that also runs on CPU ranks."""

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()  # CUDA: the stock strategy, its check included
            return
        log.info(
            "DeepSpeed on %d CPU rank(s) (gloo, DeepSpeed's CPU accelerator): Lightning's "
            "CUDA-only check of DeepSpeedStrategy.setup_environment is lifted",
            len(self.parallel_devices),
        )
        # CPU devices carry no index, but Lightning checks that the devices' indices are the
        # local ranks and hands `root_device.index` to DeepSpeed as its device rank (None
        # fails there): number them by local rank. A tensor on cpu:1 is a CPU tensor.
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        # What the stock method does after its check: set the device, then join the group.
        DDPStrategy.setup_environment(self)
