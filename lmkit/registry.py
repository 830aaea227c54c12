"""Registries: one per kind of component, filled by plugins through the hooks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lmkit.errors import ConfigError, PluginError, did_you_mean

KINDS = ("objective", "architecture", "optimizer", "scheduler", "strategy", "tokenizer", "dataset", "callback",
         "model_extension", "command")
PLURALS = {"strategy": "strategies", "model_extension": "model extensions", "command": "commands"}


def plural(kind: str) -> str:
    """``objectives``, ``strategies``, ``model extensions`` ... (headings and messages)."""
    return PLURALS.get(kind, kind + "s")


@dataclass
class Component:
    """One registered component.

    ``name``: what users write. ``factory``: builds it (signature depends on the kind, see
    :mod:`lmkit.hookspecs`). ``config_cls``: dataclass validating its config section (None =
    no options; a callback's options come from ``callback_options.<name>``). ``meta``:
    kind-specific facts, read at compose time:

    * objective: ``kinds`` (architecture kinds it trains), ``default_model`` (the ``model=``
      preset used when none is named), ``needs`` (capabilities it needs of the architecture:
      a collection, or ``(cfg, kind) -> collection``);
    * architecture: ``kind`` and ``accepts`` (capabilities it honours,
      :data:`lmkit.models.base.CAPABILITIES`).
    """

    name: str
    factory: Callable[..., Any]
    config_cls: type | None = None
    description: str = ""
    meta: dict = field(default_factory=dict)
    provider: str = ""  # distribution name, filled by the plugin manager
    version: str = ""


@dataclass
class FailedPlugin:
    """A plugin whose import or registration raised."""

    entry_point: str
    distribution: str
    version: str
    error: str

    def describe(self) -> str:
        return f"plugin '{self.entry_point}' from {self.distribution} {self.version} failed to load: {self.error}"


class Registry:
    """Name -> Component for one kind, with helpful lookup errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Component] = {}
        self.failed: list[FailedPlugin] = []

    def add(self, component: Component) -> None:
        old = self._items.get(component.name)
        if old is not None:
            if old.factory is component.factory:
                return  # the very same object registered twice is harmless
            raise PluginError(
                f"{self.kind} '{component.name}' is registered twice: by {old.provider} {old.version} "
                f"and by {component.provider} {component.version}. Uninstall one of the two "
                f"distributions, or rename the component in one of them."
            )
        self._items[component.name] = component

    def get(self, name: str) -> Component:
        if name in self._items:
            return self._items[name]
        raise ConfigError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        from lmkit.first_party import provider_of

        dist = provider_of(self.kind, name)
        failed = [f for f in self.failed if f.distribution == dist]
        if dist and failed:
            return f"{self.kind} '{name}' comes with {dist}, which failed to load: {failed[0].describe()}."
        if dist:
            from lmkit.first_party import not_installed_message

            return not_installed_message(f"{self.kind} '{name}'", self.kind, name)
        names = sorted(self._items)
        hint = did_you_mean(name, names)
        available = ", ".join(f"{n} ({self._items[n].provider})" for n in names) or "none"
        msg = f"unknown {self.kind} '{name}'.{hint} Available: {available}."
        if self.failed:
            msg += " Note: " + "; ".join(f.describe() for f in self.failed) + "."
        return msg

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items[n] for n in sorted(self._items))
