"""User-facing errors.

Anything the user can fix (a misspelled name, a bad value, a broken corpus or checkpoint)
is raised as :class:`LmkitError`. The CLI prints its message alone, without a traceback,
and exits with status 2.
"""


class LmkitError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(LmkitError):
    """A configuration value, name or combination is invalid."""


class DataError(LmkitError):
    """A corpus, dataset or token cache cannot be used."""


class CheckpointError(LmkitError):
    """A checkpoint is missing, truncated, corrupted or unsafe."""


class PluginError(LmkitError):
    """A plugin failed to load or registered a conflicting component."""
