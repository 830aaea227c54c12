"""The plugin manager: loads built-ins and ``lmkit`` entry points, fills the registries.

``python -m lmkit.plugins`` (or ``python -m lmkit plugins``) lists every component with
its provider and version, and the plugins that failed to load.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
from functools import lru_cache

import pluggy

from lmkit import hookspecs
from lmkit.errors import PluginError
from lmkit.registry import KINDS, Component, FailedPlugin, Registry, plural

ENTRY_POINT_GROUP = "lmkit"
STRICT_ENV = "LMKIT_STRICT_PLUGINS"
hookimpl = pluggy.HookimplMarker("lmkit")

_HOOK_FOR_KIND = {
    "objective": "lmkit_register_objectives",
    "architecture": "lmkit_register_architectures",
    "optimizer": "lmkit_register_optimizers",
    "scheduler": "lmkit_register_schedulers",
    "strategy": "lmkit_register_strategies",
    "tokenizer": "lmkit_register_tokenizers",
    "dataset": "lmkit_register_datasets",
    "callback": "lmkit_register_callbacks",
    "model_extension": "lmkit_register_model_extensions",
    "command": "lmkit_register_commands",
}


def warn(message: str) -> None:
    """One ``lmkit: warning:`` line on stderr (not Python's two-line ``warnings`` output)."""
    print(f"lmkit: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


class PluginManager:
    """Holds the pluggy manager, the registries and the list of failed plugins."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("lmkit")
        self.pm.add_hookspecs(hookspecs)
        self.failed: list[FailedPlugin] = []
        self._provider: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)

        from lmkit import builtins

        self._register(builtins, "lmkit", ("lmkit", _version("lmkit")))
        if load_entry_points:
            self._load_entry_points()
        self.pm.check_pending()
        self.registries = {kind: Registry(kind) for kind in KINDS}
        self._fill_registries()

    # -- loading ------------------------------------------------------------------
    def _register(self, module, name: str, provider: tuple[str, str]) -> None:
        self.pm.register(module, name=name)
        self._provider[name] = provider

    def _load_entry_points(self) -> None:
        strict = os.environ.get(STRICT_ENV, "").lower() not in ("", "0", "false", "no")
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "unknown distribution"
            version = ep.dist.version if ep.dist else "?"
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
                self._register(module, ep.name, (dist, version))
            except Exception as exc:  # a broken plugin must not take the CLI down
                failure = FailedPlugin(ep.name, dist, version, f"{type(exc).__name__}: {exc}")
                if strict:
                    raise PluginError(failure.describe() + f" (strict mode: unset {STRICT_ENV} to continue without it)") from exc
                self.failed.append(failure)
                warn(failure.describe())

    def _fill_registries(self) -> None:
        for kind, hook_name in _HOOK_FOR_KIND.items():
            registry = self.registries[kind]
            registry.failed = self.failed
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                dist, version = self._provider.get(impl.plugin_name, (impl.plugin_name, "?"))
                try:
                    components = impl.function() or []
                except Exception as exc:
                    failure = FailedPlugin(impl.plugin_name, dist, version, f"{hook_name} raised {type(exc).__name__}: {exc}")
                    self.failed.append(failure)
                    warn(failure.describe())
                    continue
                if isinstance(components, Component) or not isinstance(components, (list, tuple)):
                    raise PluginError(f"{dist} {version}: {hook_name} must return a list of lmkit.registry.Component "
                                      f"objects, got {type(components).__name__}. Fix or uninstall {dist}.")
                for component in components:
                    if not isinstance(component, Component):
                        raise PluginError(f"{dist} {version}: {hook_name} must return lmkit.registry.Component objects, got {type(component).__name__}")
                    component.provider, component.version = dist, version
                    registry.add(component)

    # -- queries ------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Component:
        return self.registries[kind].get(name)

    def config_dirs(self) -> list[str]:
        """Config directories contributed by plugins (built-ins first)."""
        dirs: list[str] = []
        for result in reversed(self.pm.hook.lmkit_config_dirs()):  # pluggy calls LIFO
            for d in result or []:
                if str(d) not in dirs:
                    dirs.append(str(d))
        return dirs

    def configure_model(self, model, run) -> None:
        self.pm.hook.lmkit_configure_model(model=model, run=run)

    def listing(self) -> str:
        lines = []
        for kind in KINDS:
            lines.append(f"{plural(kind)}:")
            for c in self.registries[kind]:
                desc = f" — {c.description}" if c.description else ""
                lines.append(f"  {c.name:<22} {c.provider} {c.version}{desc}")
        if self.failed:
            lines.append("failed plugins:")
            lines.extend(f"  {f.describe()}" for f in self.failed)
        return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "dev"


@lru_cache(maxsize=1)
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return PluginManager()


def main() -> int:
    """``python -m lmkit.plugins``: the same as ``python -m lmkit plugins``."""
    from lmkit.cli import main as cli_main

    return cli_main(["plugins"])


if __name__ == "__main__":
    sys.exit(main())
