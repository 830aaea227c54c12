"""Turn a composed config into typed, validated sections before anything runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmkit.config.schema import TOP_LEVEL_KEYS, DataConfig, LoggerConfig, TrainerConfig
from lmkit.errors import ConfigError, LmkitError, did_you_mean
from lmkit.launch import apply_launch
from lmkit.registry import Component

DEFAULT_OBJECTIVE = "causal_lm"


@dataclass
class RunConfig:
    """The validated run: typed config sections and the components they name."""

    raw: DictConfig
    model: Any
    model_component: Component
    objective: Any
    objective_component: Component
    optimizer: Any
    optimizer_component: Component
    scheduler: Any
    scheduler_component: Component
    strategy: Any
    strategy_component: Component
    tokenizer: Any
    tokenizer_component: Component
    data: DataConfig
    dataset_component: Component
    trainer: TrainerConfig
    logger: LoggerConfig
    callbacks: list[Component]
    seed: int
    resume: str | None
    model_extensions: dict = dataclasses.field(default_factory=dict)


def typed_section(section_name: str, node, schema: type | None):
    """Merge ``node`` into the dataclass ``schema``; unknown keys and wrong types name the key."""
    if schema is None:
        return node
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    field_names = {f.name for f in dataclasses.fields(schema)}
    if "name" not in field_names:
        data.pop("name", None)
    for key in data:
        if key not in field_names:
            hint = did_you_mean(key, field_names, cutoff=0.6, prefix=f"{section_name}.")
            raise ConfigError(f"unknown config key '{section_name}.{key}'.{hint} Valid keys: {', '.join(sorted(field_names))}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except LmkitError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for '{section_name}.{key}': {msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid '{section_name}' config: {e}") from None


def _split_model_extensions(model_node, pm):
    """Take the ``model.<extension>`` blocks out of the model section and validate them."""
    extensions = {}
    for ext in pm.registries["model_extension"]:
        sub = model_node.get(ext.name) if model_node is not None else None
        extensions[ext.name] = typed_section(f"model.{ext.name}", sub or {}, ext.config_cls)
    if model_node is not None and any(e in model_node for e in extensions):
        model_node = OmegaConf.masked_copy(model_node, [k for k in model_node.keys() if k not in extensions])
    return model_node, extensions


def _component_section(cfg: DictConfig, pm, section: str, kind: str, default: str | None = None, node=None):
    node = cfg.get(section) if node is None else node
    if node is None:
        if default is None:
            raise ConfigError(f"the config has no '{section}' section")
        node = OmegaConf.create({"name": default})
    name = node.get("name")
    if not name:
        raise ConfigError(f"'{section}' config has no 'name': it must name a registered {kind}")
    component = pm.get(kind, str(name))
    return typed_section(section, node, component.config_cls), component


def check_compatible(objective_component: Component, model_component: Component, model_choice: str | None, pm) -> None:
    """Refuse an objective/architecture pair the objective cannot train, suggesting fixes."""
    kinds = tuple(objective_component.meta.get("kinds", ()))
    kind = model_component.meta.get("kind")
    if not kinds or kind in kinds:
        return
    working = sorted(c.name for c in pm.registries["architecture"] if c.meta.get("kind") in kinds)
    default = objective_component.meta.get("default_model")
    fix = f" Drop model= to get its default (model={default})" if default else ""
    raise ConfigError(
        f"objective '{objective_component.name}' needs {'an' if kinds[0][0] in 'aeiou' else 'a'} {' or '.join(kinds)} architecture, but model "
        f"'{model_choice or model_component.name}' is of kind {kind} ({model_component.name}).{fix}, or choose an "
        f"architecture of a fitting kind: {', '.join(working) or 'none installed'}."
    )


def resolve_run(cfg: DictConfig, pm, model_choice: str | None = None) -> RunConfig:
    """Validate the whole composed config against the registries and schemas."""
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(str(key), TOP_LEVEL_KEYS, cutoff=0.6)
            raise ConfigError(f"unknown top-level config key '{key}'.{hint}")
    objective, objective_c = _component_section(cfg, pm, "objective", "objective", DEFAULT_OBJECTIVE)
    model_node, extensions = _split_model_extensions(cfg.get("model"), pm)
    model, model_c = _component_section(cfg, pm, "model", "architecture", node=model_node)
    check_compatible(objective_c, model_c, model_choice, pm)
    optimizer, optimizer_c = _component_section(cfg, pm, "optimizer", "optimizer")
    scheduler, scheduler_c = _component_section(cfg, pm, "scheduler", "scheduler")
    strategy, strategy_c = _component_section(cfg, pm, "strategy", "strategy")
    tokenizer, tokenizer_c = _component_section(cfg, pm, "tokenizer", "tokenizer")
    data = typed_section("data", cfg.get("data", {}), DataConfig)
    dataset_c = pm.get("dataset", data.source)
    trainer = apply_launch(typed_section("trainer", cfg.get("trainer", {}), TrainerConfig))  # torchrun/SLURM decide devices
    logger = typed_section("logger", cfg.get("logger", {}), LoggerConfig)
    callbacks = [pm.get("callback", str(n)) for n in (cfg.get("callbacks") or [])]
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and data.seq_len > max_len:
        raise ConfigError(
            f"data.seq_len={data.seq_len} is longer than the model's positions (model.max_seq_len={max_len}). "
            f"Lower data.seq_len or raise model.max_seq_len."
        )
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return RunConfig(cfg, model, model_c, objective, objective_c, optimizer, optimizer_c, scheduler, scheduler_c,
                     strategy, strategy_c, tokenizer, tokenizer_c, data, dataset_c, trainer, logger, callbacks,
                     seed, cfg.get("resume"), extensions)
