"""Write a Hugging Face model directory from an lmkit model (see :func:`export`)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


from lmkit.errors import ConfigError, LmkitError
from lmkit.interop.table import to_hf

#: objective tensors an HF class can hold, by head name (``heads`` of a family)
HEAD_PREFIXES = {"pair": "objective.pair_head."}

#: the decoder start token of the encoder-decoders when the run's objective names none
DEFAULT_DECODER_START = {"t5": "<pad>", "bart": "<eos>"}


def heads_of(head_state: dict) -> tuple[set, list[str]]:
    """The heads present (``{"pair"}``) and the objective tensors no HF class holds (left out)."""
    heads, left_out = set(), []
    for name in head_state:
        head = next((h for h, p in HEAD_PREFIXES.items() if name.startswith(p)), None)
        if head is None:
            left_out.append(name)
        else:
            heads.add(head)
    return heads, sorted(left_out)


def token_ids(tokenizer, family: str, objective: dict) -> dict:
    ids = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if family in DEFAULT_DECODER_START:
        start = objective.get("decoder_start_token") or DEFAULT_DECODER_START[family]
        ids["decoder_start_token_id"] = tokenizer.special_id(start)
    return ids


def hf_state(family, cfg, model_state: dict, head_state: dict, heads: set) -> tuple[dict, list[str]]:
    """The HF tensors (the family's table read lmkit -> HF), and what was left out (one phrase each)."""
    dropped = family.left_out(cfg, heads)
    state = {k: v for k, v in model_state.items() if not any(k.startswith(p) for p in dropped)}
    state.update({k: v for k, v in head_state.items()
                  if any(k.startswith(HEAD_PREFIXES[h]) for h in heads)})
    notes = [f"{prefix}* ({why})" for prefix, why in dropped.items()]
    return to_hf(family.table(cfg, heads), state, f"{family.name} -> {family.architecture(heads)}"), notes


def _owned_copies(state: dict) -> dict:
    """Tensors that share no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def write_dir(out_dir, files: dict[str, bytes | str], tensors: dict, force: bool = False) -> Path:
    """Write ``files`` and ``model.safetensors`` into ``out_dir`` all at once: a temporary directory next to
    it, renamed into place (an interrupted export leaves no half-written ``out_dir``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"'{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"'{out}' exists and is not empty; give an empty or new directory, or --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        save_file(_owned_copies(tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(content) if isinstance(content, str) else (tmp / name).write_bytes(content)
        old = None
        if out.is_dir():
            if any(out.iterdir()):
                old = out.with_name(f".{out.name}.old{os.getpid()}")
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export(source, out_dir, force: bool = False) -> dict:
    """Export ``source`` (an lmkit run directory or checkpoint) as an HF model directory ``out_dir``.

    Returns ``{"out_dir", "architecture", "checkpoint", "left_out", "tensors"}``.
    """
    from lmkit.interop.families import family_of
    from lmkit.interop.source import read_source
    from lmkit.interop.tokenizer import tokenizer_files

    src = read_source(source)
    family = family_of(src.architecture)
    heads, left_out = heads_of(src.head_state)
    family.check(src.config, heads)
    tensors, dropped = hf_state(family, src.config, src.model_state, src.head_state, heads)
    config = family.hf_config(src.config, token_ids(src.tokenizer, family.name, src.objective), heads)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    files = {"config.json": json.dumps(config, indent=2, ensure_ascii=False)}
    files.update(tokenizer_files(src.tokenizer, family.name, getattr(src.config, "max_seq_len", None)))
    out = write_dir(out_dir, files, tensors, force=force)
    return {"out_dir": str(out), "architecture": config["architectures"][0], "checkpoint": str(src.checkpoint),
            "left_out": dropped + _objective_note(left_out, config["architectures"][0]), "tensors": len(tensors)}


def _objective_note(names: list[str], architecture: str) -> list[str]:
    """One phrase for the objective tensors left out, grouped by module (``objective.sbo.*``)."""
    if not names:
        return []
    groups = sorted({n.split(".")[1] + (".*" if n.count(".") > 1 else "") for n in names})
    return [f"{', '.join('objective.' + g for g in groups)} (training-only objective heads; {architecture} has no "
            f"place for them)"]


def export_model(model, tokenizer, out_dir, head_state: dict | None = None, objective: dict | None = None,
                 force: bool = False) -> dict:
    """Export an in-memory lmkit model (and its tokenizer) as an HF directory (for scripts and tests)."""
    from lmkit.interop.families import family_of
    from lmkit.interop.tokenizer import tokenizer_files

    cfg = model.cfg
    family = family_of(cfg.name)
    if not isinstance(model, family.model_cls):
        raise LmkitError(f"{type(model).__name__} is not lmkit's {family.name} model")
    moe = [n for n, mod in model.named_modules() if callable(getattr(mod, "lmkit_aux_losses", None))]
    if moe:
        raise ConfigError(f"this {family.name} model has mixture-of-experts layers ({moe[0]}, ...): Hugging Face's "
                          f"{family.architecture(set())} has one dense MLP per layer, so it cannot hold them")
    head_state = head_state or {}
    heads, _ = heads_of(head_state)
    family.check(cfg, heads)
    tensors, dropped = hf_state(family, cfg, model.state_dict(), head_state, heads)
    config = family.hf_config(cfg, token_ids(tokenizer, family.name, objective or {}), heads)
    files = {"config.json": json.dumps(config, indent=2, ensure_ascii=False)}
    files.update(tokenizer_files(tokenizer, family.name, getattr(cfg, "max_seq_len", None)))
    out = write_dir(out_dir, files, tensors, force=force)
    return {"out_dir": str(out), "architecture": config["architectures"][0], "tensors": len(tensors), "left_out": dropped}

