"""Compose the configs under `conf/` and instantiate their targets from code, as the entry
points do."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """`conf/<config_name>.yaml` with `overrides`, as `python -m src.<entry> <overrides>`
    composes it (`${hydra:...}` interpolations resolve; the `hydra` node is dropped)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_overrides() -> list[str] | None:
    """The command-line overrides of the current Hydra run (or `compose`), None outside one."""
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting a `ConfigError` raised by the target through as
    itself (Hydra wraps it in a multi-line InstantiationException), so entry points print
    it as one line."""
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def as_lists(
    cfg: DictConfig, examples: Mapping[str, str], may_be_empty: tuple[str, ...] = ()
) -> None:
    """Make each key of `examples` (a dotted key of `cfg` that takes a list) a list, in
    `cfg`: a scalar (`batch_sizes=1` on the command line) is the one-element list, and an
    empty one is a ConfigError with the example, unless the key is in `may_be_empty`."""
    for key, example in examples.items():
        value = OmegaConf.select(cfg, key)
        if not OmegaConf.is_list(value):
            OmegaConf.update(cfg, key, [value], merge=False)
        elif not value and key not in may_be_empty:
            raise ConfigError(f"{key}=[] leaves nothing to measure: pass e.g. {key}={example}")
