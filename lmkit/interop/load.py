"""Load a local Hugging Face model directory into an lmkit model and tokenizer (the tables read backwards).

``config.json`` decides the family (``model_type``) and the sizes; the weights come from
``model.safetensors`` (preferred; also sharded ``model.safetensors.index.json``) or
``pytorch_model.bin``, which is read with ``torch.load(weights_only=True)`` only. No hub
access: the path must be a local directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.errors import CheckpointError, ConfigError
from lmkit.interop.table import from_hf


@dataclass
class Loaded:
    architecture: str  # lmkit architecture name
    config: object  # its config dataclass
    model: torch.nn.Module
    tokenizer: object | None  # None when the directory has no tokenizer lmkit can read (tokenizer=False)
    heads: dict  # objective tensors (``objective.pair_head.weight`` ...) found in the file
    fresh: list  # lmkit tensors the file lacked (initialised fresh; only with allow_missing)
    hf_config: dict


def read_hf_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a directory: give a local Hugging Face model directory "
                          f"(config.json and model.safetensors); lmkit never downloads")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"'{path}' has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{cfg}' is not valid JSON ({e})") from None


def read_hf_weights(path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: safetensors (single or sharded) preferred, else a .bin read weights-only."""
    from safetensors.torch import load_file

    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"'{binary}' was refused: lmkit reads .bin files with weights_only=True "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); convert it to "
                                  f"model.safetensors") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"'{binary}' holds a {type(state).__name__}, not a dict of tensors")
        return state
    raise CheckpointError(f"'{path}' has no model.safetensors (nor model.safetensors.index.json or pytorch_model.bin)")


def _add_base_prefix(state: dict, family, table) -> dict:
    """Files saved from the bare base model (``GPT2Model``: ``wte.weight``) get the prefix the table uses."""
    prefix = {"gpt2": "transformer.", "bert": "bert.", "albert": "albert.", "llama": "model."}.get(family.model_type)
    if prefix is None or any(k.startswith(prefix) for k in state):
        return state
    return {prefix + k: v for k, v in state.items()}


def convert_hf_state(family, cfg, state: dict, heads: set, allow_missing=None, unexpected: list | None = None):
    """HF tensors -> lmkit tensors (names ``objective.*`` for heads) through the family's table."""
    table = family.table(cfg, heads)
    state = _add_base_prefix(state, family, table)
    return from_hf(table, state, f"{family.architecture(heads)} -> lmkit {family.name}", allow_missing, unexpected)


def load_hf(path, *, tokenizer: bool = True, allow_missing=None, dtype: torch.dtype | None = None) -> Loaded:
    """An lmkit model (eval mode) + tokenizer from the local HF directory ``path``.

    ``allow_missing(lmkit_name) -> bool``: tensors the file may lack (they keep their fresh
    initialisation and are listed in ``Loaded.fresh``); by default every tensor must be there.
    """
    from lmkit.interop.exporter import HEAD_PREFIXES
    from lmkit.interop.families import family_of_model_type
    from lmkit.interop.tokenizer import load_tokenizer_dir

    hf = read_hf_config(path)
    family = family_of_model_type(hf.get("model_type"), path)
    state = read_hf_weights(path)
    cfg = family.lm_config(hf, state)
    hint = hf.get("lmkit") if isinstance(hf.get("lmkit"), dict) else {}
    archs = hf.get("architectures") or []
    heads = set(hint.get("heads", [])) | ({"pair"} if any(a.endswith("ForPreTraining") for a in archs) else set())
    heads = {h for h in heads if h in HEAD_PREFIXES}
    if "pair" in heads and not family.has_pair_tensor(state):
        heads.discard("pair")
    family.check(cfg, heads)
    model = family.model_cls(cfg)
    converted, fresh = convert_hf_state(family, cfg, state, heads, allow_missing)
    model_part = {k: v for k, v in converted.items() if not k.startswith("objective.")}
    head_part = {k: v for k, v in converted.items() if k.startswith("objective.")}
    expected = model.state_dict()
    for name, t in model_part.items():
        if name in expected and tuple(expected[name].shape) != tuple(t.shape):
            raise CheckpointError(f"'{path}': tensor '{name}' has shape {list(t.shape)} in the file but "
                                  f"{list(expected[name].shape)} in the model config.json describes")
    result = model.load_state_dict(model_part, strict=allow_missing is None)
    if allow_missing is not None:
        unexpected = list(result.unexpected_keys)
        if unexpected:
            raise CheckpointError(f"'{path}': unexpected tensors {unexpected[:8]}")
        fresh = sorted(set(fresh) | {k for k in result.missing_keys if not k.startswith("objective.")})
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tok = load_tokenizer_dir(path) if tokenizer else None
    return Loaded(family.name, cfg, model, tok, head_part, fresh, hf)
