"""Range checks for config dataclasses: each raises :class:`ConfigError` naming the key, the value and the fix.

Torch-free, so that the config schemas (and plugins' ``config_cls``) can use them cheaply.
``key`` is the dotted name the user writes (``model.dropout``, ``optimizer.eps``).
"""
from __future__ import annotations

import math

from lmkit.errors import ConfigError, did_you_mean


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(key: str, value, minimum: int | None = None, maximum: int | None = None, hint: str = "",
              optional: bool = False) -> None:
    """``value`` is an int in [minimum, maximum] (None allowed with ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer{' or null' if optional else ''}, got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}{' or null' if optional else ''}, got {value}{hint}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {value}{hint}")


def check_finite(key: str, value, hint: str = "") -> None:
    """``value`` is a finite number (not NaN, not inf)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}{hint}")


def check_positive(key: str, value, hint: str = "") -> None:
    """``value`` is a finite number > 0."""
    check_finite(key, value, hint)
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}{hint}")


def check_non_negative(key: str, value, hint: str = "") -> None:
    """``value`` is a finite number >= 0."""
    check_finite(key, value, hint)
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}{hint}")


def check_range(key: str, value, low: float, high: float, high_open: bool = False, hint: str = "") -> None:
    """``value`` is a finite number in [low, high] (or [low, high) with ``high_open``)."""
    interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
    if not _is_number(value) or not math.isfinite(value) or value < low or value > high or (high_open and value == high):
        raise ConfigError(f"{key} must be in {interval}, got {value!r}{hint}")


def check_probability(key: str, value, hint: str = "") -> None:
    """A dropout rate or similar probability: [0, 1) (1 would drop everything)."""
    check_range(key, value, 0.0, 1.0, high_open=True, hint=hint or " (0 = off; 1 would drop every activation)")


def check_choice(key: str, value, choices) -> None:
    """``value`` is one of ``choices``; a near miss gets a did-you-mean."""
    choices = tuple(choices)
    if value not in choices:
        hint = did_you_mean(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}.{hint}".rstrip("."))


def serves_own_records(objective_component) -> bool:
    """Whether an objective reads whole records (classification) or pre-cut rows (sft) instead of cutting
    blocks from the packed text stream: the data features built on that stream (mixtures, data.val_path,
    length schedules, extra validation lengths, litdata stores) do not apply to it."""
    factory = objective_component.factory
    return bool(getattr(factory, "example_based", False)) or getattr(factory, "data_source", None) is not None
