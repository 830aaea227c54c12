"""Command-line overrides: checked against the config tree before Hydra runs anything.

Hydra would report a misspelled group option or key only after creating the run
directory, and without suggestions; lmkit checks them first and says what to write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lmkit.errors import ConfigError, did_you_mean

GROUPS = ("model", "objective", "optimizer", "scheduler", "data", "tokenizer", "trainer", "strategy", "logger", "experiment")


@dataclass
class ParsedArgs:
    overrides: list[str]
    hydra_flags: list[str] = field(default_factory=list)
    multirun: bool = False
    group_choices: dict[str, list[str]] = field(default_factory=dict)


def split_args(argv: list[str]) -> ParsedArgs:
    """Separate Hydra's flags (-m, --cfg job, ...) from overrides."""
    overrides, flags, multirun = [], [], False
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
            flags.append(arg)
        elif arg.startswith("-"):
            flags.append(arg)
            if arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                       "--config-path", "-cp", "--info", "-i", "--experimental-rerun") and "=" not in arg:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(arg)
    return ParsedArgs(overrides, flags, multirun)


def group_options(config_dirs: list[str]) -> dict[str, list[str]]:
    """Available options of each config group across the core and plugin config dirs."""
    options: dict[str, set[str]] = {g: set() for g in GROUPS}
    for d in config_dirs:
        for group in GROUPS:
            gdir = Path(d) / group
            if gdir.is_dir():
                options[group].update(p.stem for p in gdir.glob("*.yaml"))
    return {g: sorted(v) for g, v in options.items()}


def check_overrides(args: ParsedArgs, config_dirs: list[str], model_extensions=()) -> ParsedArgs:
    """Validate group choices; fill ``args.group_choices``. Raises ConfigError with a fix.

    ``model.<extension>.key=value`` for a registered model extension is rewritten to a
    force-add (``++``), since architectures' own configs do not carry extension blocks.
    """
    args.overrides = [
        f"++{o}" if any(o.startswith(f"model.{e}.") for e in model_extensions) else o for o in args.overrides
    ]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse the command line: {e}") from None
    options = group_options(config_dirs)
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra"):
            continue
        if key == "objective" and not ov.is_add() and not ov.is_force_add() and not ov.is_delete():
            raise ConfigError(
                f"'objective' is not in the defaults list, so it is added with a plus: write "
                f"'+objective={ov.input_line.split('=', 1)[-1]}' instead of '{ov.input_line}'."
            )
        if key not in GROUPS or ov.is_delete():
            continue
        if ov.is_sweep_override():
            values = [str(v) for v in ov.sweep_iterator()]
        else:
            values = [str(ov.value())]
        for value in values:
            if value not in options[key] and value != "null":
                raise ConfigError(
                    f"unknown {key} '{value}'.{did_you_mean(value, options[key])} "
                    f"Available for {key}=: {', '.join(options[key]) or 'none'}."
                )
        args.group_choices[key] = values
    return args


def first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep replaced by its first value (for a pre-flight compose)."""
    parser = OverridesParser.create()
    out = []
    for ov, line in zip(parser.parse_overrides(overrides), overrides):
        if ov.is_sweep_override():
            first = next(iter(ov.sweep_iterator()))
            prefix = line.split(ov.key_or_group, 1)[0]
            out.append(f"{prefix}{ov.key_or_group}={first}")
        else:
            out.append(line)
    return out


def _missing_key_message(cfg: DictConfig, dotted: str) -> str | None:
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            siblings = [str(k) for k in node.keys()]
            where = ".".join(parts[:i]) or "the root"
            hint = did_you_mean(part, siblings, cutoff=0.6, prefix="".join(p + "." for p in parts[:i]))
            return (f"unknown config key '{dotted}': '{part}' is not a key of {where}.{hint} "
                    f"(To add a new key on purpose, write '+{dotted}=...'.)")
        node = node[part]
    return None


def compose_config(config_dirs: list[str], overrides: list[str]) -> DictConfig:
    """Compose the config the way the CLI will, with lmkit's error messages."""
    core, extra = config_dirs[0], config_dirs[1:]
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    searchpath = [f"hydra.searchpath=[{','.join('file://' + d for d in extra)}]"] if extra else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=core, version_base="1.3"):
        group_only = [o for o in overrides if o.lstrip("+").split("=", 1)[0] in GROUPS]
        base = compose("config", overrides=searchpath + group_only)
        for o in overrides:
            if o.startswith(("+", "~")) or "=" not in o:
                continue
            key = o.split("=", 1)[0]
            if key in GROUPS:
                continue
            msg = _missing_key_message(base, key)
            if msg:
                raise ConfigError(msg)
        try:
            cfg = compose("config", overrides=searchpath + overrides)
        except HydraException as e:
            raise ConfigError(str(e).splitlines()[0]) from None
    GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    return cfg
