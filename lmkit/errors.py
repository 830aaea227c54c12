"""User-facing errors.

Anything the user can fix (a misspelled name, a bad value, a broken corpus or checkpoint)
is raised as :class:`LmkitError`. The CLI prints its message alone, without a traceback,
and exits with status 2.
"""
import difflib


def did_you_mean(value: str, choices, cutoff: float = 0.5, prefix: str = "") -> str:
    """`` Did you mean '<prefix><closest choice>'?`` for a misspelled ``value``, or "" when none is close."""
    close = difflib.get_close_matches(value, sorted(choices), n=1, cutoff=cutoff)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


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
