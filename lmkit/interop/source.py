"""A trained lmkit model on disk: a run directory or one of its checkpoints, read for export.

A run directory holds ``config.yaml``, ``tokenizer.json`` and ``checkpoints/*.ckpt`` (see
:func:`lmkit.train.save_run_files`); a checkpoint is read with its run directory's config and
tokenizer. Sharded (fsdp) checkpoints are gathered with ``lmkit_fsdp.consolidate`` when the
plugin is installed; pipeline checkpoints are ordinary whole-model files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lmkit.errors import CheckpointError, ConfigError


@dataclass
class Source:
    architecture: str
    config: object  # the architecture's config dataclass, vocab_size filled in
    model_state: dict  # model tensors, names without "model."
    head_state: dict  # objective tensors, names with "objective."
    tokenizer: object
    objective: dict  # the run's objective section (name, decoder_start_token, ...)
    checkpoint: Path
    run_dir: Path
    run_config: dict  # the run's whole config.yaml, resolved


def _newest_checkpoint(run_dir: Path) -> Path:
    from lmkit.checkpoint import CHECKPOINT_DIR, _candidates

    found = _candidates(run_dir)
    if not found:
        raise CheckpointError(f"'{run_dir}' has no checkpoint in {CHECKPOINT_DIR}/ (a run writes one every "
                              f"trainer.checkpoint_every_n_steps steps and at its end)")
    return found[0]


def locate(path) -> tuple[Path, Path]:
    """(run directory, checkpoint) of ``path``: a run directory or a checkpoint inside one."""
    from lmkit.checkpoint import CHECKPOINT_DIR, is_sharded_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{path}' does not exist: give a run directory (with config.yaml and "
                              f"{CHECKPOINT_DIR}/) or a checkpoint file inside one")
    if p.is_dir() and not is_sharded_checkpoint(p):
        if not (p / "config.yaml").is_file():
            raise CheckpointError(f"'{path}' is not an lmkit run directory (no config.yaml)")
        return p, _newest_checkpoint(p)
    run_dir = p.parent.parent if p.parent.name == CHECKPOINT_DIR else p.parent
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"checkpoint '{path}' has no config.yaml in its run directory '{run_dir}': export "
                              f"needs the run's model settings (give the checkpoint inside its run directory)")
    return run_dir, p


def load_weights(ckpt: Path) -> dict:
    """The checkpoint's ``state_dict`` (weights only; sharded checkpoints gathered)."""
    from lmkit.checkpoint import is_sharded_checkpoint, load_checkpoint_file

    if is_sharded_checkpoint(ckpt):
        try:
            from lmkit_fsdp.consolidate import load_sharded
        except ImportError:
            raise CheckpointError(
                f"'{ckpt}' is a sharded checkpoint; reading it needs the lmkit-fsdp plugin (pip install lmkit-fsdp), "
                f"or consolidate it elsewhere first: python -m lmkit_fsdp.consolidate {ckpt} OUT.ckpt") from None
        try:
            state = load_sharded(ckpt)["state_dict"]
        except Exception as e:
            raise CheckpointError(f"cannot read sharded checkpoint '{ckpt}' ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return load_checkpoint_file(ckpt)["state_dict"]


def model_config(node: dict, state: dict, config_cls) -> object:
    """The architecture's config from the run's ``model`` section (extensions refused or dropped)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    moe = node.get("moe")
    if isinstance(moe, dict) and (moe.get("num_experts") or 0) > 0:
        raise ConfigError(
            f"this {node.get('name')} model has switch mixture-of-experts layers (model.moe.num_experts="
            f"{moe['num_experts']}): Hugging Face's {node.get('name')} classes have one dense MLP per layer, so "
            f"they cannot hold it")
    unknown = [k for k in node if k not in names and not isinstance(node[k], dict)]
    if unknown:
        raise ConfigError(f"the run's model section has settings lmkit's {node.get('name')} does not know: {unknown}")
    kwargs = {k: v for k, v in node.items() if k in names}
    if kwargs.get("vocab_size") is None:
        for key in ("wte.weight", "shared.weight"):
            if key in state:
                kwargs["vocab_size"] = int(state[key].shape[0])
    return config_cls(**kwargs)


def read_source(path) -> Source:
    from omegaconf import OmegaConf

    from lmkit.interop.families import family_of
    from lmkit.tokenizers.trained import load_tokenizer_file

    run_dir, ckpt = locate(path)
    raw = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    node = raw.get("model") or {}
    family = family_of(str(node.get("name")))
    state = load_weights(ckpt)
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    head_state = {k: v for k, v in state.items() if k.startswith("objective.")}
    other = [k for k in state if not k.startswith(("model.", "objective."))]
    if other:
        raise CheckpointError(f"checkpoint '{ckpt}' holds tensors outside the model and objective: {other[:5]}")
    cfg = model_config(node, model_state, family.config_cls)
    from lmkit.adapters import merged_model_state

    model_state = merged_model_state(node, family.model_cls, cfg, model_state)  # LoRA merged: the base's tensors
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"'{run_dir}' has no tokenizer.json (written with config.yaml when the run starts)")
    tokenizer = load_tokenizer_file(tok_path)
    return Source(family.name, cfg, model_state, head_state, tokenizer, raw.get("objective") or {}, ckpt, run_dir, raw)

