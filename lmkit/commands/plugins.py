"""``python -m lmkit plugins``: every registered component, its provider and version, and failed plugins."""
from __future__ import annotations

from lmkit.errors import ConfigError


def main(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"'plugins' takes no arguments, got: {' '.join(argv)}")
    from lmkit.plugins import get_plugin_manager

    print(get_plugin_manager().listing())
    return 0
