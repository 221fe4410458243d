"""The decode settings (SPEC section 3), validated here and nowhere else.

Their defaults are `conf/decode/default.yaml`; `DecodeSettings.resolve` turns a decode config
(any mapping with those keys) into settings for an export trained with a given block size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.config import CONF_DIR, ConfigError

# How decoder=verified drafts (SPEC 6): one forward per draft, or SPEC 3's threshold loop.
DRAFTS = ("single", "threshold")


@dataclass(frozen=True)
class DecodeSettings:
    """How `generate` decodes: block and sub-block sizes, the unmasking threshold (>= 1: one
    token per step; 0: a sub-block per step), the token budget, the sub-block cache switch,
    sampling (temperature 0: greedy), whether a block size other than the trained one is
    allowed (the paper's Table 4 ablation), and how `decoder=verified` drafts (`draft`:
    `single`, one forward proposing every masked position of the block, or `threshold`,
    SPEC 3's threshold loop; SPEC 6)."""

    block_size: int
    sub_block_size: int
    threshold: float
    max_new_tokens: int
    use_sub_block_cache: bool
    temperature: float
    top_p: float
    allow_block_size_mismatch: bool = False
    draft: str = "single"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), {"int": int, "float": (int, float)}.get(f.type)
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"decode.{f.name}={value!r} must be true or false")
            if kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ConfigError(f"decode.{f.name}={value!r} must be a number")
        if self.block_size < 1:
            raise ConfigError(f"decode.block_size={self.block_size} must be >= 1")
        if self.sub_block_size < 1 or self.block_size % self.sub_block_size:
            raise ConfigError(
                f"decode.sub_block_size={self.sub_block_size} must divide "
                f"decode.block_size={self.block_size} (e.g. 4, 8 or 16 for 32)"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"decode.threshold={self.threshold} must be in [0, 1] (1.0 = one token per step)"
            )
        if self.max_new_tokens < 1:
            raise ConfigError(f"decode.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"decode.temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"decode.top_p={self.top_p} must be in (0, 1]")
        if self.draft not in DRAFTS:
            raise ConfigError(f"decode.draft={self.draft!r}: choose {' or '.join(DRAFTS)}")

    @classmethod
    def resolve(cls, decode: Mapping[str, Any], trained_block_size: int) -> DecodeSettings:
        """Settings from a decode config; `block_size` null means the trained one.

        SPEC section 3: decoding with another block size than the trained one hurts, so an
        explicit mismatch is an error unless `allow_block_size_mismatch`.
        """
        if isinstance(decode, DictConfig):
            decode = OmegaConf.to_container(decode, resolve=True)
        values = dict(decode)
        fields = dataclasses.fields(cls)
        missing = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ConfigError(f"the decode config lacks {', '.join(missing)}: see conf/decode/")
        if values["block_size"] is None:
            values["block_size"] = trained_block_size
        elif values["block_size"] != trained_block_size and not values.get(
            "allow_block_size_mismatch"
        ):
            raise ConfigError(
                f"decode.block_size={values['block_size']} differs from the trained block size "
                f"{trained_block_size}: drop it, or set decode.allow_block_size_mismatch=true"
            )
        return cls(**{f.name: values[f.name] for f in fields if f.name in values})

    @staticmethod
    def defaults() -> dict[str, Any]:
        """`conf/decode/default.yaml`, `block_size` null (the trained one): what the command
        lines decode with unless told otherwise."""
        decode = OmegaConf.load(CONF_DIR / "decode" / "default.yaml")
        decode.block_size = None
        return OmegaConf.to_container(decode)

    def replace(self, **changes: Any) -> DecodeSettings:
        """A copy with `changes`, validated like any other."""
        return dataclasses.replace(self, **changes)

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `src.decoding.generate` these settings stand for."""
        values = dataclasses.asdict(self)
        del values["allow_block_size_mismatch"], values["draft"]
        return values

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
