"""Memory plan of a training run: parameters and per-GPU memory under DDP, ZeRO-2, ZeRO-3 and
ZeRO-3 with CPU offload, at the run's micro-batch and sequence length, before renting GPUs;
and the preemption lead time: one optimizer step plus one checkpoint write (`cluster.*`).

    python -m src.plan experiment=qwen7b trainer.num_nodes=8 trainer.devices=8
    python -m src.plan experiment=qwen7b model.pretrained=/models/Qwen2.5-7B-Instruct
    python -m src.plan experiment=qwen1_5b plan.gpu_memory_gb=40 data.seq_len=4096

See `src.training.plan` for what is counted and how.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from src.config import ConfigError
from src.training.plan import format_lead_time, format_plan, memory_plan, preemption_lead_time


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    try:
        plan = memory_plan(cfg)
        lead = preemption_lead_time(cfg)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"config error: {err}") from None
    print(format_plan(plan, cfg))
    print(format_lead_time(lead, cfg))


if __name__ == "__main__":
    main()
