"""Turn a composed config into typed, validated sections before anything runs."""
from __future__ import annotations

import dataclasses
import os
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
    #: name -> validated ``callback_options.<name>`` (the callback's ``config_cls``), None without one
    callback_configs: dict = dataclasses.field(default_factory=dict)


def typed_section(section_name: str, node, schema: type | None):
    """Merge ``node`` into the dataclass ``schema``; unknown keys and wrong types name the key.

    A float the user set must be finite: NaN or inf anywhere (a learning rate, a dropout, a
    timeout) is refused, naming the key; a schema's own non-finite default is left alone.
    """
    if schema is None:
        return node
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        from lmkit.errors import PluginError

        raise PluginError(
            f"the config class of '{section_name}' ({getattr(schema, '__module__', '?')}."
            f"{getattr(schema, '__qualname__', type(schema).__name__)}) is not a dataclass: a component's config_cls "
            f"must be a @dataclass (or None for no options). Fix or uninstall the plugin that registers it."
        )
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
        obj = OmegaConf.to_object(merged)
    except LmkitError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value for '{section_name}.{key}': {msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid '{section_name}' config: {e}") from None
    except Exception as e:  # a plugin's __post_init__ that fails another way: one line naming the section
        raise ConfigError(f"invalid '{section_name}' config: {type(e).__name__}: {e}") from None
    _check_finite_fields(section_name, obj)
    return obj


def _check_finite_fields(section_name: str, obj) -> None:
    """Every float of the dataclass ``obj`` (lists and nested dataclasses included) is finite."""
    import math

    def check(key, value, default=dataclasses.MISSING):
        if isinstance(value, float) and not math.isfinite(value) and not (
                isinstance(default, float) and (default == value)):
            raise ConfigError(f"{key} must be a finite number, got {value}. NaN and inf are refused everywhere in the "
                              f"config; write a finite value.")
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                check(f"{key}[{i}]", item)
        elif isinstance(value, dict):
            for k, item in value.items():
                check(f"{key}.{k}", item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                check(f"{key}.{f.name}", getattr(value, f.name, None), f.default)

    check(section_name, obj)


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


def model_presets(pm) -> dict[str, str]:
    """``model=`` preset -> the architecture its yaml names (``name:``), over the core and plugin config dirs."""
    from pathlib import Path

    import yaml

    presets: dict[str, str] = {}
    for d in pm.config_dirs():
        for path in sorted(Path(d, "model").glob("*.yaml")):
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            name = data.get("name") if isinstance(data, dict) else None
            if isinstance(name, str):
                presets.setdefault(path.stem, name)
    return presets


def _objective_needs(objective_component: Component, objective_cfg, kind) -> frozenset[str]:
    from lmkit.errors import PluginError
    from lmkit.objectives.base import objective_needs

    try:
        return objective_needs(objective_component, objective_cfg, kind)
    except LmkitError:
        raise
    except Exception as e:  # a plugin's needs callable that breaks: name it, not a traceback
        raise PluginError(f"objective '{objective_component.name}' ({objective_component.provider}): computing what it "
                          f"needs of the architecture (meta['needs']) raised {type(e).__name__}: {e}") from None


def check_compatible(objective_component: Component, model_component: Component, model_choice: str | None, pm,
                     objective_cfg=None) -> None:
    """Refuse an objective/architecture pair the objective cannot train, suggesting fixes.

    Two checks: the architecture's kind is one of the objective's ``meta["kinds"]``, and it
    accepts every capability the objective needs under its validated ``objective_cfg``
    (:func:`lmkit.objectives.base.objective_needs` against
    :func:`lmkit.models.base.architecture_accepts`; an architecture whose capabilities cannot
    be known is not checked). The error names the ``model=`` presets that would work.
    """
    from lmkit.models.base import CAPABILITIES, architecture_accepts

    kinds = tuple(objective_component.meta.get("kinds", ()))
    kind = model_component.meta.get("kind")
    objective, model = objective_component.name, model_choice or model_component.name

    def missing_of(component: Component, unknown_fits: bool = True) -> list[str]:
        """Needed capabilities ``component`` lacks; one whose capabilities are unknown lacks none
        (or, for suggestions, ``unknown_fits=False``, all of them)."""
        needs = _objective_needs(objective_component, objective_cfg, component.meta.get("kind"))
        accepts = architecture_accepts(component)
        if accepts is None:
            return [] if unknown_fits else sorted(needs)
        return sorted(needs - accepts)

    def fixes(first: list[str]) -> str:
        """'A, b, or c.' from the fixes that apply, ending with the presets (or architectures) that fit."""
        options = list(first)
        default = objective_component.meta.get("default_model")
        if default and default != model:
            options.append(f"drop model= to get its default (model={default})")
        fitting = sorted(c.name for c in pm.registries["architecture"]
                         if (not kinds or c.meta.get("kind") in kinds) and not missing_of(c, unknown_fits=False))
        presets = sorted(p for p, arch in model_presets(pm).items() if arch in fitting)
        if presets:
            options.append(f"choose a model= preset that fits: {', '.join(presets)} "
                           f"(architectures: {', '.join(fitting)})")
        elif fitting:
            options.append(f"choose an architecture that fits: {', '.join(fitting)} (no model= preset names one)")
        text = ", or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)
        if not fitting:
            text = (text + ". " if text else "") + "No installed architecture fits"
        return text[:1].upper() + text[1:] + "."

    if kinds and kind not in kinds:
        article = "an" if kinds[0][0] in "aeiou" else "a"
        raise ConfigError(
            f"objective '{objective}' needs {article} {' or '.join(kinds)} architecture, but model '{model}' is of kind "
            f"{kind} ({model_component.name}). {fixes([])}"
        )
    missing = missing_of(model_component)
    if not missing:
        return
    described = "; ".join(f"{cap} ({CAPABILITIES[cap]})" if cap in CAPABILITIES else cap for cap in missing)
    first = []
    if "document_ids" in missing and getattr(objective_cfg, "document_mask", False):
        first.append("set objective.document_mask=false")
    accepts = sorted(architecture_accepts(model_component))
    raise ConfigError(
        f"objective '{objective}' needs an architecture that accepts {described}, but architecture "
        f"'{model_component.name}' (model={model}, from {model_component.provider or 'an unknown distribution'}) "
        f"does not (it accepts: {', '.join(accepts) or 'no optional inputs'}). {fixes(first)}"
    )


def resolve_callbacks(cfg: DictConfig, pm) -> tuple[list[Component], dict[str, Any]]:
    """``callbacks`` (a list of names) and ``callback_options.<name>`` (their options), validated.

    Returns the enabled callbacks' components and name -> validated options (an instance of
    the callback's ``config_cls``, defaults for keys not given; None for a callback without
    one). Options of a callback that is not enabled, or of one without options, are refused.
    """
    names = cfg.get("callbacks") or []
    if isinstance(names, str):
        names = [names]
    components = []
    for entry in names:
        if not isinstance(entry, str):
            raise ConfigError(
                f"callbacks lists callback names, got {entry!r}. A callback's options go under "
                f"callback_options.<name>, e.g. +callback_options.lr_monitor.logging_interval=epoch"
            )
        components.append(pm.get("callback", entry))
    options = cfg.get("callback_options") or {}
    if not isinstance(options, (dict, DictConfig)):
        raise ConfigError(f"callback_options must map callback names to their options, got {options!r}")
    enabled = {c.name for c in components}
    for name in options:
        if name in enabled:
            continue
        if name not in pm.registries["callback"]:
            raise ConfigError(f"callback_options.{name}: {pm.registries['callback'].unknown_message(str(name))}")
        listed = ",".join([c.name for c in components] + [str(name)])
        raise ConfigError(f"callback_options.{name} is set, but callback '{name}' is not enabled: add it to callbacks "
                          f"(callbacks=[{listed}]) or drop its options.")
    configs: dict[str, Any] = {}
    for c in components:
        node = options.get(c.name)
        if node is not None and not isinstance(node, (dict, DictConfig)):
            raise ConfigError(f"callback_options.{c.name} must be a mapping of option: value, got {node!r}")
        if c.config_cls is None:
            if node:
                raise ConfigError(f"callback '{c.name}' ({c.provider}) takes no options, but callback_options.{c.name} "
                                  f"sets {', '.join(str(k) for k in node)}.")
            configs[c.name] = None
        else:
            configs[c.name] = typed_section(f"callback_options.{c.name}", node or {}, c.config_cls)
    return components, configs


def check_accelerator_visible(trainer: TrainerConfig, cuda_count=None, mps=None) -> None:
    """The accelerator and devices asked for exist on this machine (Lightning would raise deep in its Trainer)."""
    import torch

    accel = str(trainer.accelerator)
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if mps is None:
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if accel in ("gpu", "cuda") and cuda_count == 0:
        raise ConfigError(f"trainer.accelerator={accel} but no CUDA device is visible (torch.cuda.is_available() is "
                          f"False{'; CUDA_VISIBLE_DEVICES=' + repr(os.environ['CUDA_VISIBLE_DEVICES']) if 'CUDA_VISIBLE_DEVICES' in os.environ else ''}). "
                          f"Use trainer.accelerator=cpu, or auto (a GPU when one is visible, else the CPU).")
    if accel == "mps" and not mps:
        raise ConfigError("trainer.accelerator=mps but Apple's MPS backend is not available here. "
                          "Use trainer.accelerator=cpu or auto.")
    if accel == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError("trainer.accelerator=tpu needs torch_xla, which is not installed. "
                              "Use trainer.accelerator=cpu or auto.")
    devices = trainer.devices
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and cuda_count > 0)
    on_cpu = accel == "cpu" or (accel == "auto" and cuda_count == 0 and not mps)
    if on_gpu:
        wanted = devices if isinstance(devices, int) else None
        indices = devices if isinstance(devices, list) else (
            [int(d) for d in devices.split(",") if d.strip()] if isinstance(devices, str) and devices != "auto" else [])
        if wanted is not None and wanted > cuda_count:
            raise ConfigError(f"trainer.devices={wanted} but only {cuda_count} CUDA device(s) are visible. "
                              f"Use trainer.devices={cuda_count} (or -1 for all of them).")
        missing = [i for i in indices if i >= cuda_count]
        if missing:
            raise ConfigError(f"trainer.devices asks for GPU {missing[0]}, but only {cuda_count} CUDA device(s) are "
                              f"visible (indices 0..{cuda_count - 1}).")
    elif on_cpu and not (devices == "auto" or (isinstance(devices, int) and devices >= 1)):
        raise ConfigError(f"trainer.devices={devices!r} on the CPU: there, trainer.devices is a number of processes "
                          f"(>= 1) or auto; device indices and -1 are for GPUs.")


def _min_parameters(model) -> int | None:
    """A lower bound on the parameters of a built-in architecture's config (None for other configs).

    Counts only what is certainly allocated: the token embedding (the tokenizer's vocabulary is at
    least 266), learned position embeddings, and each distinct block's attention and MLP weights.
    """
    if not type(model).__module__.startswith("lmkit.models."):
        return None
    try:
        d, name = int(model.d_model), model.name
        if name == "llama":  # q and output projections (K/V may be grouped), SwiGLU: three d x d_ff matrices
            from lmkit.models.llama import llama_ffn_size

            d_ff = int(model.d_ff or llama_ffn_size(d, int(model.ffn_multiple_of)))
            return int(model.vocab_size or 266) * d + int(model.n_layer) * (2 * d * d + 3 * d * d_ff)
        d_ff = int(model.d_ff or 4 * d)
        width = int(getattr(model, "embedding_size", d)) if name == "albert" else d
        vocab = int(model.vocab_size or 266)
        blocks = 1 if name == "albert" else int(model.n_layer) + int(getattr(model, "n_decoder_layer", None) or
                                                                    (model.n_layer if name in ("t5", "bart") else 0))
        positions = {"gpt": 1, "bert": 1, "albert": 1, "bart": 2}.get(name, 0) * int(model.max_seq_len)
    except (AttributeError, TypeError, ValueError):
        return None
    return vocab * width + positions * width + blocks * (4 * d * d + 2 * d * d_ff)


def _memory_bytes() -> int | None:
    """This machine's memory (the cgroup limit when lower), or None when it cannot be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_model_fits_memory(model, optimizer, trainer: TrainerConfig, memory: int | None = None) -> None:
    """Refuse a model whose weights cannot even be allocated (every process builds the whole model in
    fp32 on the CPU first), or, training on the CPU, whose weights, gradients and optimizer state
    exceed this machine's memory: such a run would be killed by the OS (SIGKILL, no message)."""
    params = _min_parameters(model)
    memory = _memory_bytes() if memory is None else memory
    if params is None or not memory:
        return
    gib = 1024 ** 3
    sizes = (f"model.d_model={model.d_model}, model.n_layer={model.n_layer}, model.max_seq_len={model.max_seq_len}"
             + (f", model.vocab_size={model.vocab_size}" if model.vocab_size else ""))
    if params * 4 > memory:
        raise ConfigError(f"the model cannot be built here: it has at least {params / 1e9:,.1f}B parameters "
                          f"({params * 4 / gib:,.1f} GiB in fp32; {sizes}), more than this machine's "
                          f"{memory / gib:,.1f} GiB of memory. Lower model.max_seq_len, model.d_model or model.n_layer.")
    import torch

    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    name = getattr(optimizer, "name", "")
    states = {"adam": 2, "adamw": 2, "sgd": 1 if getattr(optimizer, "momentum", 0) else 0}.get(name, 0)
    if on_cpu and params * 4 * (2 + states) > memory:
        raise ConfigError(f"the model cannot train on this machine's CPU: it has at least {params / 1e9:,.1f}B "
                          f"parameters, and its fp32 weights, gradients and {states} {name} state(s) take "
                          f"{params * 4 * (2 + states) / gib:,.1f} GiB, more than the {memory / gib:,.1f} GiB of memory "
                          f"({sizes}). Lower model.max_seq_len, model.d_model or model.n_layer, or train on GPUs.")


def _warn_past_the_end(trainer: TrainerConfig, scheduler, data: DataConfig) -> None:
    """Warm-up or batch ramps longer than the run are allowed (a short test of a long recipe), with one warning each.

    Printed once per run: by the check before Hydra starts (and by the API), not again inside the run.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():  # inside the CLI's run: its pre-flight check already warned
            return
    except ImportError:
        pass
    from lmkit.plugins import warn

    steps = trainer.max_steps
    warmup = getattr(scheduler, "warmup_steps", None)
    if getattr(scheduler, "name", None) == "inverse_sqrt":  # no ramp: optimizer.lr until warmup_steps, then 1/sqrt
        if isinstance(warmup, int) and warmup >= steps:
            warn(f"scheduler.warmup_steps={warmup} is not shorter than the run (trainer.max_steps={steps}): the "
                 f"inverse square root schedule keeps optimizer.lr throughout and never decays. Lower "
                 f"scheduler.warmup_steps if that is not what you want.")
        warmup = None
    last_switch = data.seq_len_schedule[-1]["until_step"] if data.seq_len_schedule else 0
    if last_switch >= steps:
        warn(f"data.seq_len_schedule's last phase ends at step {last_switch}, not before the end of the run "
             f"(trainer.max_steps={steps}): no step trains at data.seq_len={data.seq_len}. Lower its until_step "
             f"if that is not what you want.")
    if isinstance(warmup, int) and warmup > steps:
        warn(f"scheduler.warmup_steps={warmup} is longer than the run (trainer.max_steps={steps}): the learning rate "
             f"never reaches optimizer.lr (it ends at {steps / warmup:.0%} of it). Lower scheduler.warmup_steps "
             f"if that is not what you want.")
    if data.batch_ramp_steps > steps:
        if data.grad_accum > data.batch_ramp_start:
            what = (f"the batch never reaches its full size (data.grad_accum={data.grad_accum} micro-batches per step)")
        else:
            what = (f"the ramp does nothing anyway (data.batch_ramp_start={data.batch_ramp_start} is not below "
                    f"data.grad_accum={data.grad_accum})")
        warn(f"data.batch_ramp_steps={data.batch_ramp_steps} is longer than the run (trainer.max_steps={steps}): "
             f"{what}. Lower data.batch_ramp_steps if that is not what you want.")


def resolve_run(cfg: DictConfig, pm, model_choice: str | None = None) -> RunConfig:
    """Validate the whole composed config against the registries and schemas."""
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(str(key), TOP_LEVEL_KEYS, cutoff=0.6)
            raise ConfigError(f"unknown top-level config key '{key}'.{hint}")
    objective, objective_c = _component_section(cfg, pm, "objective", "objective", DEFAULT_OBJECTIVE)
    model_node, extensions = _split_model_extensions(cfg.get("model"), pm)
    model, model_c = _component_section(cfg, pm, "model", "architecture", node=model_node)
    check_compatible(objective_c, model_c, model_choice, pm, objective)
    optimizer, optimizer_c = _component_section(cfg, pm, "optimizer", "optimizer")
    scheduler, scheduler_c = _component_section(cfg, pm, "scheduler", "scheduler")
    strategy, strategy_c = _component_section(cfg, pm, "strategy", "strategy")
    tokenizer, tokenizer_c = _component_section(cfg, pm, "tokenizer", "tokenizer")
    data = typed_section("data", cfg.get("data", {}), DataConfig)
    dataset_c = pm.get("dataset", data.source)
    from lmkit.data.mixture import check_run as check_mixture_run

    check_mixture_run(data, pm, objective_c)  # data.mixture's sources, data.val_path with the objective
    from lmkit.data.litdata_store import check_run as check_litdata_run

    check_litdata_run(data, objective_c)
    # under torchrun/SLURM, devices and nodes left at their defaults come from the launcher
    trainer = apply_launch(typed_section("trainer", cfg.get("trainer", {}), TrainerConfig), strict=False)
    logger = typed_section("logger", cfg.get("logger", {}), LoggerConfig)
    callbacks, callback_configs = resolve_callbacks(cfg, pm)
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and data.seq_len > max_len:
        raise ConfigError(
            f"data.seq_len={data.seq_len} is longer than the model's positions (model.max_seq_len={max_len}). "
            f"Lower data.seq_len or raise model.max_seq_len."
        )
    if data.seq_len_schedule:  # every phase's length fits the model, and the objective cuts packed text
        from lmkit.data.seq_len_schedule import check_max_len, check_objective

        check_max_len(data.seq_len_schedule, max_len)
        check_objective(data.seq_len_schedule, objective_c)
    from lmkit.data.val_lengths import check_run as check_val_lengths

    check_val_lengths(data, objective_c, max_len)
    if getattr(model, "attention_window", None) is not None:
        from lmkit.models.local_attention import check_window_fits

        check_window_fits(model, data.seq_len)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"seed must be in [0, 2**32 - 1] = [0, 4294967295] (what numpy's and torch's generators "
                          f"take), got {seed!r}")
    check_accelerator_visible(trainer)
    check_model_fits_memory(model, optimizer, trainer)
    _warn_past_the_end(trainer, scheduler, data)
    return RunConfig(cfg, model, model_c, objective, objective_c, optimizer, optimizer_c, scheduler, scheduler_c,
                     strategy, strategy_c, tokenizer, tokenizer_c, data, dataset_c, trainer, logger, callbacks,
                     seed, cfg.get("resume"), extensions, callback_configs=callback_configs)
