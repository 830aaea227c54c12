"""Command-line overrides: checked against the config tree before Hydra runs anything.

Hydra would report a misspelled group option or key only after creating the run
directory, and without suggestions; lmkit checks them first and says what to write.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmkit.errors import ConfigError, did_you_mean
from lmkit.first_party import not_installed_message

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


def _extension_of(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "model" else None


def check_overrides(args: ParsedArgs, config_dirs: list[str], model_extensions=(), pm=None) -> ParsedArgs:
    """Validate group choices; fill ``args.group_choices``. Raises ConfigError with a fix.

    ``model.<extension>.key=value`` for a registered model extension is rewritten to a
    force-add (``++``), since architectures' own configs do not carry extension blocks. An
    option that belongs to a first-party plugin that is not installed names the plugin.
    """
    args.overrides = [
        f"++{o.lstrip('+')}" if _extension_of(o.lstrip("+").split("=", 1)[0]) in model_extensions else o
        for o in args.overrides
    ]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse the command line: {str(e).strip().splitlines()[0]}") from None
    options = group_options(config_dirs)
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra"):
            continue
        extension = _extension_of(key)
        if extension and extension not in model_extensions:
            missing = not_installed_message(f"'{key}' (model.{extension}.*)", "model_extension", extension)
            if missing:
                raise ConfigError(missing)
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
                missing = not_installed_message(f"{key} '{value}'", key, value)
                if missing:
                    raise ConfigError(missing)
                raise ConfigError(
                    f"unknown {key} '{value}'.{did_you_mean(value, options[key])} "
                    f"Available for {key}=: {', '.join(options[key]) or 'none'}."
                )
        args.group_choices[key] = values
    return args


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every job of a sweep as its own list of overrides (one list when nothing sweeps), in Hydra's order."""
    import itertools

    parser = OverridesParser.create()
    per_override = []
    for ov, line in zip(parser.parse_overrides(overrides), overrides):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            per_override.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            per_override.append([line])
    return [list(job) for job in itertools.product(*per_override)]


def first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep replaced by its first value."""
    return expand_sweeps(overrides)[0]


def _missing_key_message(cfg: DictConfig, dotted: str) -> str | None:
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            siblings = [str(k) for k in node.keys()]
            where = ".".join(parts[:i]) or "the root"
            hint = did_you_mean(part, siblings, cutoff=0.6, prefix="".join(p + "." for p in parts[:i]))
            owners = _architectures_with_option(part) if parts[:i] == ["model"] else []
            if owners:
                return (f"model.{part} is not an option of architecture '{node.get('name')}'; only "
                        f"{', '.join(owners)} have it. Choose a model= preset of those, or drop model.{part}.")
            presets = _data_presets_with_option(part) if parts[:i] == ["data"] else []
            if presets:
                return (f"data.{part} is an option of the data={'|'.join(presets)} preset, not of "
                        f"data={node.get('source')}: write data={presets[0]} data.{part}=...")
            return (f"unknown config key '{dotted}': '{part}' is not a key of {where}.{hint} "
                    f"(To add a new key on purpose, write '+{dotted}=...'.)")
        node = node[part]
    return None


def _architectures_with_option(option: str) -> list[str]:
    """The registered architectures whose config dataclass has the field ``option`` (sorted)."""
    import dataclasses

    from lmkit.plugins import get_plugin_manager

    try:
        registry = get_plugin_manager().registries["architecture"]
        return sorted(name for name in registry.names()
                      if dataclasses.is_dataclass(registry.get(name).config_cls)
                      and option in {f.name for f in dataclasses.fields(registry.get(name).config_cls)})
    except Exception:  # noqa: BLE001 - a hint only: never hide the unknown-key message behind a plugin failure
        return []


def _data_presets_with_option(option: str) -> list[str]:
    """The built-in ``data=`` presets (conf/data/*.yaml) that list the key ``option`` (sorted)."""
    from lmkit.conf_path import core_conf_dir

    found = []
    for path in sorted((core_conf_dir() / "data").glob("*.yaml")):
        try:
            keys = OmegaConf.load(path).keys()
        except Exception:  # noqa: BLE001 - a hint only
            continue
        if option in keys:
            found.append(path.stem)
    return found


def _check_hydra_keys(hydra_overrides: list[str], searchpath: list[str]) -> None:
    """Misspelled ``hydra.*`` keys get lmkit's message (Hydra's own is a multi-line usage error, exit 1)."""
    if not hydra_overrides:
        return
    full = compose("config", overrides=searchpath, return_hydra_config=True)
    for o in hydra_overrides:
        if o.startswith(("+", "~")) or "=" not in o:
            continue
        msg = _missing_key_message(full, o.split("=", 1)[0])
        if msg:
            raise ConfigError(msg)
    try:
        compose("config", overrides=searchpath + hydra_overrides, return_hydra_config=True)
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _group_conflict_message(error: HydraException, group_overrides: list[str]) -> str:
    """Hydra's first line, plus the fix when an ``experiment=`` preset already chose a group given with ``+``."""
    first = str(error).splitlines()[0]
    match = re.match(r"Multiple values for (\w+)", first)
    experiment = next((o.split("=", 1)[1] for o in group_overrides if o.lstrip("+").startswith("experiment=")), None)
    if match and experiment:
        group = match.group(1)
        given = next((o for o in group_overrides if o.lstrip("+").startswith(f"{group}=")), f"+{group}=...")
        return (f"experiment={experiment} already chooses the {group}: drop '{given}' (a preset fixes its {group}; "
                f"change the preset's {group} options with {group}.KEY=VALUE).")
    return first


def _check_interpolations(cfg: DictConfig) -> None:
    """Every ``${...}`` resolves (a bad one would otherwise surface as a traceback mid-validation)."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"cannot resolve the value of '{key}': {str(e).splitlines()[0]}") from None


def compose_config(config_dirs: list[str], overrides: list[str]) -> DictConfig:
    """Compose the config the way the CLI will, with lmkit's error messages."""
    core, extra = config_dirs[0], config_dirs[1:]
    hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    searchpath = [f"hydra.searchpath=[{','.join('file://' + d for d in extra)}]"] if extra else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=core, version_base="1.3"):
        _check_hydra_keys(hydra_overrides, searchpath)
        group_only = [o for o in overrides if o.lstrip("+").split("=", 1)[0] in GROUPS]
        try:
            base = compose("config", overrides=searchpath + group_only)
        except HydraException as e:
            raise ConfigError(_group_conflict_message(e, group_only)) from None
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
    _check_interpolations(cfg)
    return cfg
