"""The frozen teacher of ``distillation``: loading, holding it, and initialising a student from it.

The teacher is read by the loader the other verbs use (:func:`lmkit.generation.load_for_generation`:
an lmkit run directory or checkpoint, or a local Hugging Face directory), frozen and put in eval
mode. The objective holds it outside its module tree, so it is in no optimizer, no checkpoint,
and Lightning's ``train()`` calls never reach it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmkit.errors import ConfigError


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def teacher_tokenizer(path: str):
    """The tokenizer of the teacher at ``path`` (without loading its weights)."""
    from lmkit.errors import CheckpointError

    p = Path(path)
    if is_hf_dir(p):
        from lmkit.interop.tokenizer import load_tokenizer_dir

        return load_tokenizer_dir(p)
    from lmkit.interop.source import locate
    from lmkit.tokenizers.trained import load_tokenizer_file

    try:
        run_dir, _ = locate(p)
    except CheckpointError as e:
        raise ConfigError(f"objective.teacher={path}: {e}") from None
    if not (run_dir / "tokenizer.json").is_file():
        raise ConfigError(f"objective.teacher={path}: '{run_dir}' has no tokenizer.json")
    return load_tokenizer_file(run_dir / "tokenizer.json")


class Teacher(nn.Module):
    """A frozen model that answers (last hidden states, LM logits at chosen positions) in one forward.

    The logits are computed inside :meth:`forward` so that a sharding wrapper (FSDP2) gathers
    the root's parameters (embeddings, LM head) for the whole call. Always in eval mode:
    :meth:`train` leaves dropout off whatever it is asked.
    """

    def __init__(self, model: nn.Module, architecture: str):
        super().__init__()
        self.model = model
        self.architecture = architecture
        self.kind = model.kind
        model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def transformer_blocks(self):
        return self.model.transformer_blocks() if hasattr(self.model, "transformer_blocks") else []

    @torch.no_grad()
    def forward(self, input_ids, positions, **kwargs):
        hidden = self.model(input_ids, **kwargs)
        return hidden, self.model.logits(hidden[positions])


def load_teacher(path: str) -> Teacher:
    """The teacher at ``path``, frozen, in eval mode, on the CPU (moved to the student's device and dtype
    at its first use)."""
    from lmkit.errors import CheckpointError
    from lmkit.generation import load_for_generation

    try:
        model, _, info = load_for_generation(path, allow_encoders=True)
    except CheckpointError as e:
        raise ConfigError(f"objective.teacher={path}: {e}") from None
    return Teacher(model, info["architecture"])


def block_names(model: nn.Module) -> list[str]:
    """The module path of each of ``model``'s transformer blocks, in order (shared blocks named each time)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return [names[id(b)] for b in model.transformer_blocks()]


def teacher_layers(cfg_layers, n_student: int, n_teacher: int) -> list[int]:
    """The teacher layer each student layer starts from: ``cfg_layers``, or DistilBERT's every other layer (2i)."""
    layers = list(cfg_layers) if cfg_layers is not None else [2 * i for i in range(n_student)]
    if len(layers) != n_student:
        raise ConfigError(f"objective.teacher_layers names {len(layers)} layers but the student has {n_student} "
                          f"(model.n_layer): give one teacher layer per student layer")
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_teacher]
    if bad:
        hint = ("" if cfg_layers is not None else
                f" (every other layer, 2i, needs model.n_layer <= {(n_teacher + 1) // 2}; or give "
                f"objective.teacher_layers=[...] explicitly)")
        raise ConfigError(f"teacher layer {bad[0]} does not exist: the teacher has {n_teacher} layers (0..{n_teacher - 1})"
                          f"{hint}")
    return layers


def student_init_state(student: nn.Module, teacher: nn.Module, layers: list[int]) -> tuple[dict, list[str]]:
    """Teacher tensors for the student: block ``i`` from teacher block ``layers[i]``, every other tensor by name.

    Returns ({student name: teacher tensor}, [mismatches "name: student shape vs teacher shape"]).
    Student tensors the teacher lacks (a pooler, segment embeddings) are left out (they keep
    their initialisation); teacher tensors the student lacks are not used.
    """
    s_blocks, t_blocks = block_names(student), block_names(teacher)
    t_state = teacher.state_dict()
    mapped, mismatched = {}, []
    for name, value in student.state_dict().items():
        source = name
        for i, prefix in enumerate(s_blocks):
            if name.startswith(prefix + "."):
                source = t_blocks[layers[i]] + name[len(prefix):]
                break
        if source not in t_state:
            continue
        if t_state[source].shape != value.shape:
            mismatched.append(f"{name}: {list(value.shape)} vs {source}: {list(t_state[source].shape)}")
            continue
        mapped[name] = t_state[source]
    return mapped, mismatched
