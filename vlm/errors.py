"""Errors a user can fix. The CLI prints these as one line and exits non-zero; anything else
is a bug and keeps its traceback."""


class VlmError(Exception):
    """Base for user-facing errors (bad config, missing input, unreachable cluster)."""


class ConfigError(VlmError):
    """A config file, key or value is wrong."""


class InputError(VlmError):
    """An input path, file or column is missing or unreadable."""


class ClusterError(VlmError):
    """Ray could not be reached or started."""
