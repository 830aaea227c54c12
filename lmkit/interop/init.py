"""``init_from=PATH``: start a run from existing weights, with a fresh optimizer, schedule and data position.

PATH is a local Hugging Face model directory of an exportable family (config.json decides the
architecture and sizes, the tokenizer comes from the directory) or an lmkit run directory or
checkpoint (weights only; its config.yaml decides the sizes, its tokenizer.json the tokenizer),
or a bare weights file (``torch.save(model.state_dict())``, read with ``weights_only=True``; the
run's own model settings and tokenizer).

* The run's model section must name the same architecture; its size settings are replaced by
  the source's, and each one that differed is named in one line (never silently). Options that
  do not change the weights' shapes or meaning (dropout, init, compile) stay the run's.
* Tensors the run needs but the source lacks (a head the source was not trained with: NSP's
  pair head, BERT's pooler) keep their fresh initialisation and are listed in one line;
  tensors of the source the run does not use are listed too. A tensor whose shape differs is
  an error naming it and both shapes.
* A resumed run (``resume=``) takes its weights from the checkpoint; init_from then only fixes
  the model sizes and tokenizer (so ``resume=auto init_from=...`` restarts correctly).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.errors import CheckpointError, ConfigError

#: architecture config fields the run keeps: they do not change the meaning of the source's weights (a pooler
#: the source lacks is initialised fresh, one the run does not use is listed)
RUN_OPTIONS = ("name", "dropout", "init", "init_std", "init_factor", "compile", "pooler", "attention", "attention_window")


@dataclass
class InitPlan:
    path: str
    kind: str  # "hf" or "lmkit"
    run: object  # the RunConfig with the source's model sizes
    tokenizer: object | None  # None: the run builds its own (a bare weights file)
    family: object | None  # HF family (kind "hf")
    state: dict  # HF tensors (kind "hf") or lmkit model tensors (kind "lmkit")
    head_state: dict  # lmkit objective tensors (kind "lmkit")
    notes: list

    def apply(self, model, objective) -> None:
        """Load the weights into ``model`` and ``objective`` (after ``objective.attach(model)``)."""
        load_into(self, model, objective)


def _say(message: str) -> None:
    print(f"lmkit: init_from: {message}", flush=True)


def _merge_model_config(run, source_cfg, path: str) -> tuple[object, list[str]]:
    """The run's model config with the source's sizes; the differences, named."""
    arch = getattr(run.model, "name", None)
    if arch != source_cfg.name:
        raise ConfigError(f"init_from={path} holds a {source_cfg.name} model, but the run's model is {arch}: choose a "
                          f"{source_cfg.name} preset (e.g. model={source_cfg.name}_tiny; the sizes come from the source)")
    changes, fields = [], {}
    for f in dataclasses.fields(source_cfg):
        if f.name in RUN_OPTIONS:
            continue
        ours, theirs = getattr(run.model, f.name, None), getattr(source_cfg, f.name)
        fields[f.name] = theirs
        if ours is not None and ours != theirs:
            changes.append(f"model.{f.name}={theirs!r} (was {ours!r})")
    return dataclasses.replace(run.model, **fields), changes


def prepare_init(run) -> InitPlan:
    """Read ``run``'s ``init_from`` source: the model sizes, the tokenizer and the tensors (loaded later)."""
    path = str(run.raw.get("init_from"))
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"init_from={path} does not exist: give a local Hugging Face model directory (config.json "
                          f"+ model.safetensors) or an lmkit run directory or checkpoint")
    if p.is_dir() and (p / "config.json").is_file():
        plan = _prepare_hf(run, p)
    else:
        plan = _prepare_lmkit(run, p)
    _set_model(run, plan.run.model)
    plan.run = new_run = run
    max_len = getattr(new_run.model, "max_seq_len", None)
    if max_len is not None and new_run.data.seq_len > max_len and new_run.model.name != "t5":
        raise ConfigError(f"data.seq_len={new_run.data.seq_len} is longer than the positions of init_from={path} "
                          f"(max_seq_len={max_len}); lower data.seq_len")
    needed = getattr(run.objective_component.factory, "sentinels_needed", None)
    if plan.tokenizer is None:  # a bare weights file: the run builds its own tokenizer
        return plan
    if needed is not None:
        want = needed(run.objective, run.data.seq_len)
        if want > plan.tokenizer.num_sentinels:
            raise ConfigError(f"the tokenizer of init_from={path} has {plan.tokenizer.num_sentinels} sentinel tokens; "
                              f"objective {run.objective_component.name} needs {want} at data.seq_len={run.data.seq_len}")
    vocab = getattr(new_run.model, "vocab_size", None)
    if vocab is not None and vocab < plan.tokenizer.vocab_size:
        raise ConfigError(f"init_from={path}: the model's vocabulary ({vocab}) is smaller than its tokenizer's "
                          f"({plan.tokenizer.vocab_size})")
    return plan


def _set_model(run, model_cfg) -> None:
    """Give ``run`` (in place: the caller's RunConfig, whose raw config is saved as the run's config.yaml)
    the source's model config."""
    from omegaconf import open_dict

    run.model = model_cfg
    with open_dict(run.raw):
        for f in dataclasses.fields(model_cfg):
            if f.name in RUN_OPTIONS or f.name not in run.raw.model and getattr(model_cfg, f.name) is None:
                continue
            run.raw.model[f.name] = getattr(model_cfg, f.name)


def _prepare_hf(run, p: Path) -> InitPlan:
    from lmkit.interop.families import family_of_model_type
    from lmkit.interop.load import read_hf_config, read_hf_weights
    from lmkit.interop.tokenizer import load_tokenizer_dir

    hf = read_hf_config(p)
    family = family_of_model_type(hf.get("model_type"), p)
    state = read_hf_weights(p)
    source_cfg = family.lm_config(hf, state)
    model_cfg, changes = _merge_model_config(run, source_cfg, str(p))
    if changes:
        _say(f"the model's sizes come from {p / 'config.json'}: {', '.join(changes)}")
    tokenizer = load_tokenizer_dir(p)
    return InitPlan(str(p), "hf", dataclasses.replace(run, model=model_cfg), tokenizer, family, state, {}, changes)


def _prepare_lmkit(run, p: Path) -> InitPlan:
    from omegaconf import OmegaConf

    from lmkit.interop.source import load_weights, locate
    from lmkit.tokenizers.trained import load_tokenizer_file

    if p.is_file() and not (p.parent.parent / "config.yaml").is_file() and not (p.parent / "config.yaml").is_file():
        return _prepare_bare(run, p)
    run_dir, ckpt = locate(p)
    raw = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    node = dict(raw.get("model") or {})
    if node.get("name") != getattr(run.model, "name", None):
        raise ConfigError(f"init_from={p} holds a {node.get('name')} model, but the run's model is "
                          f"{getattr(run.model, 'name', None)}: choose a {node.get('name')} model preset")
    state = load_weights(ckpt)
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    head_state = {k: v for k, v in state.items() if k.startswith("objective.")}
    cls = type(run.model)
    if isinstance(node.get("lora"), dict):  # a LoRA run: its adapters merged into the base weights
        from lmkit.adapters import merged_model_state
        from lmkit.interop.source import model_config

        model_state = merged_model_state(node, run.model_component.factory, model_config(node, model_state, cls),
                                         model_state, refuse_prompt=False)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in node.items() if k in names}
    if kwargs.get("vocab_size") is None:
        kwargs.pop("vocab_size", None)
    source_cfg = dataclasses.replace(run.model, **kwargs)
    model_cfg, changes = _merge_model_config(run, source_cfg, str(p))
    if changes:
        _say(f"the model's sizes come from {run_dir / 'config.yaml'}: {', '.join(changes)}")
    if not (run_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"init_from={p}: '{run_dir}' has no tokenizer.json")
    tokenizer = load_tokenizer_file(run_dir / "tokenizer.json")
    return InitPlan(str(ckpt), "lmkit", dataclasses.replace(run, model=model_cfg), tokenizer, None, model_state,
                    head_state, changes)


def _prepare_bare(run, p: Path) -> InitPlan:
    """A weights file without a run directory (a bare state_dict, or a checkpoint of another program): the
    run's own model settings and tokenizer; the tensors by name (``model.`` / ``objective.`` prefixes)."""
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"init_from={p} cannot be read as weights (loaded with weights_only=True: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"init_from={p} holds no mapping of tensor names to tensors")
    prefixed = any(k.startswith(("model.", "objective.")) for k in state)
    model_state = {k.removeprefix("model."): v for k, v in state.items()
                   if not prefixed or k.startswith("model.")}
    head_state = {k: v for k, v in state.items() if prefixed and k.startswith("objective.")}
    return InitPlan(str(p), "lmkit", run, None, None, model_state, head_state, [])


def _short(names: list[str], limit: int = 12) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_into(plan: InitPlan, model, objective) -> dict:
    """Copy the source's tensors into ``model``/``objective``; returns {"loaded", "fresh", "unused"}."""
    ours = {k: v for k, v in model.state_dict().items()}
    ours.update({f"objective.{k}": v for k, v in objective.state_dict().items()})
    unused: list[str] = []
    if plan.kind == "hf":
        from lmkit.interop.load import convert_hf_state

        heads = {"pair"} if "objective.pair_head.weight" in ours else set()
        cfg = model.cfg if hasattr(model, "cfg") else plan.run.model
        converted, _ = convert_hf_state(plan.family, cfg, plan.state, heads, allow_missing=lambda n: True,
                                        unexpected=unused)
    else:
        converted = dict(plan.state)
        converted.update(plan.head_state)
    for name in list(converted):
        if name not in ours:
            unused.append(name)
            del converted[name]
    mismatched = [(k, list(v.shape), list(ours[k].shape)) for k, v in converted.items() if v.shape != ours[k].shape]
    if mismatched:
        name, theirs, mine = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"init_from={plan.path}: tensor '{name}' has shape {theirs} there but {mine} in this "
                              f"run's model{more}")
    with torch.no_grad():
        for name, value in converted.items():
            ours[name].copy_(value.to(ours[name].dtype))
    fresh = sorted(k for k in ours if k not in converted)
    _say(f"loaded {len(converted)} tensors from {plan.path}; optimizer, schedule and data start fresh")
    if fresh:
        _say(f"initialised fresh (not in the source): {_short(fresh)}")
    if unused:
        _say(f"not used (this run has no place for them): {_short(sorted(unused))}")
    return {"loaded": sorted(converted), "fresh": fresh, "unused": sorted(unused)}
