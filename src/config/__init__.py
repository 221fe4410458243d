"""Config plumbing shared by every entry point: the error type, OmegaConf resolvers, composing
the configs under `conf/`, launcher checks and logger factories.

The rules a config must follow live with what they configure (decoding settings in
`src.decoding.settings`, the objective in `src.diffusion.settings`, ...); this package sits
below every other one, so any of them may raise `ConfigError`.
"""

from src.config import resolvers as _resolvers  # noqa: F401  (registers the resolvers)
from src.config.compose import CONF_DIR, as_lists, compose, instantiate, run_overrides
from src.config.errors import ConfigError

__all__ = ["CONF_DIR", "ConfigError", "as_lists", "compose", "instantiate", "run_overrides"]
