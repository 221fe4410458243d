"""OmegaConf resolvers used in `conf/`, registered on import of `src.config`."""

from __future__ import annotations

import importlib.util

from omegaconf import OmegaConf

GPU_ACCELERATORS = ("gpu", "cuda")


def package_path(package: str) -> str:
    """Folder of an installed package, found without importing it (`${package_path:name}`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: pip install {package}")
    return spec.submodule_search_locations[0]


def gpus_per_node(accelerator: str, devices: int) -> int | None:
    """GPUs a job requests per node: one per device when training on GPUs, none otherwise."""
    return int(devices) if accelerator in GPU_ACCELERATORS else None


OmegaConf.register_new_resolver("package_path", package_path, replace=True)
OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node, replace=True)
