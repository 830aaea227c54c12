"""``python -m lmkit --help`` and ``--version``: lmkit's own, built from what is installed."""
from __future__ import annotations

import importlib.metadata as md

from lmkit.errors import ConfigError

USAGE = "usage: python -m lmkit [COMMAND] [KEY=VALUE ...] [+objective=NAME] [-m]"


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "dev"


def version_text(pm=None) -> str:
    """lmkit's version, its plugin distributions' and the libraries a run depends on."""
    lines = [f"lmkit {_version('lmkit')}"]
    if pm is not None:
        plugins = sorted({prov for name, prov in pm._provider.items() if prov[0] != "lmkit"})
        lines += [f"  plugin {dist} {ver}" for dist, ver in plugins]
        lines += [f"  failed plugin {f.distribution} {f.version}" for f in pm.failed]
    lines.append("  " + ", ".join(f"{d} {_version(d)}" for d in ("torch", "lightning", "hydra-core")))
    return "\n".join(lines)


def help_text(pm) -> str:
    from lmkit.commands import all_verbs
    from lmkit.config.compose import GROUPS, group_options
    from lmkit.first_party import FIRST_PARTY, install_hint

    verbs = all_verbs(pm)
    options = group_options(pm.config_dirs())
    width = max(len(v) for v in verbs) + 2
    out = [USAGE, "", "Commands (the default is train):"]
    out += [f"  {name:<{width}}{v.summary}" for name, v in verbs.items()]
    out += ["", "Training is composed from config groups (GROUP=OPTION) and keys (KEY=VALUE):",
            f"  {'+objective=':<16}{', '.join(options['objective'])}  (default causal_lm; its natural model unless model= is given)"]
    for group in GROUPS:
        if group != "objective" and options[group]:
            out.append(f"  {group + '=':<16}{', '.join(options[group])}")
    extensions = pm.registries["model_extension"].names()
    if extensions:
        out.append(f"  {'model.<ext>.KEY':<16}model extensions: {', '.join(extensions)}")
    out += ["  KEY=VALUE       e.g. trainer.max_steps=100 data.batch_size=8 optimizer.lr=3e-4 seed=1",
            "  resume=PATH     a run directory, a checkpoint or 'last' (continues in that run's directory; fork=true for a new one)",
            "", "Flags:",
            "  -m, --multirun  sweep: optimizer.lr=1e-3,3e-4 runs one job per value (every job is checked first)",
            "  --cfg job       print the composed config without training",
            "  --version       lmkit's and its plugins' versions",
            "  --hydra-help    Hydra's own flags"]
    def installed(kind: str, name: str) -> bool:
        if kind == "command":
            from lmkit.commands import all_verbs

            return name in all_verbs(pm)
        # callbacks and config-group presets (model=...) are named through their component
        return kind not in pm.registries or kind == "callback" or name in pm.registries[kind]

    missing = []
    for dist, provides in FIRST_PARTY.items():
        names = [n for kind, ns in provides.items() for n in ns if not installed(kind, n)]
        if names:
            missing.append(f"  {', '.join(names)}: {install_hint(dist)}")
    if missing:
        out += ["", "Not installed (first-party plugins):"] + missing
    out += ["", "Every component, its provider and version: python -m lmkit plugins"]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"--help takes no arguments, got: {' '.join(argv)}")
    from lmkit.plugins import get_plugin_manager

    print(help_text(get_plugin_manager()))
    return 0


def version_main(argv: list[str]) -> int:
    from lmkit.plugins import get_plugin_manager

    print(version_text(get_plugin_manager()))
    return 0
