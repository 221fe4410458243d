"""Prepare a run's chat data once: render, label, pack, write memory-mapped shards.

    python -m src.prepare_data experiment=qwen7b num_proc=32 max_tokens=1400000000
    python -m src.train experiment=qwen7b                 # reads data.prepared
    python -m src.prepare_data experiment=tiny out=data/tiny && \\
        python -m src.train experiment=tiny data.prepared=data/tiny

Takes the same overrides as the training run (conf/prepare_data.yaml), so the data are
prepared with the run's tokenizer, source, seq_len, block size and padding; training checks
the directory's manifest against them. See `src.data.prepare`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.data.prepare import prepare
from src.model import build_tokenizer, check_model_source

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.out is None:
            raise ConfigError("pass out=<dir> (the run has no data.prepared)")
        check_model_source(cfg.model)
        manifest = prepare(
            build_tokenizer(cfg.model),
            OmegaConf.to_container(cfg.data.source, resolve=True),
            seq_len=cfg.data.seq_len,
            block_size=cfg.data.block_size,
            pad_to_block=cfg.data.pad_to_block,
            out=cfg.out,
            num_proc=cfg.num_proc,
            max_tokens=cfg.max_tokens,
            overwrite=cfg.overwrite,
        )
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    for split, info in manifest["splits"].items():
        log.info(
            "%s: %d contexts, %d tokens (%d supervised) in %.0f s",
            split,
            info["contexts"],
            info["tokens"],
            info["supervised_tokens"],
            info["seconds"],
        )
    print(f"prepared {cfg.out}: train with data.prepared={cfg.out}")


if __name__ == "__main__":
    main()
