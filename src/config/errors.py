"""The pipeline's user-facing error type (kept import-light: data code raises it too)."""


class ConfigError(ValueError):
    """A config that cannot run; the message says which key to change and how.

    Entry points turn it into one `config error: ...` line before anything expensive starts.
    """
