"""One checkpoint layout for every strategy: the plain model's parameter names and shapes.

A tensor-parallel plan may rename parameters (the GPT's fused ``attn.qkv`` becomes
``attn.q``/``attn.k``/``attn.v`` so that each rank holds whole heads). A
:class:`CheckpointLayout` records those renamings as :class:`Fusion` s and converts state
dicts both ways, so that a checkpoint written under ``fsdp_tp`` has exactly the keys and
shapes of one written by a plain or ``fsdp`` run: any of them resumes any other, on any
number of ranks, and consolidates to a file a single-process run loads.

State dicts here are flat ``{fqn: tensor}`` (model) or ``{"state": {fqn: {name: tensor}},
"param_groups": [{..., "params": [fqn, ...]}]}`` (optimizer, as
``torch.distributed.checkpoint.state_dict`` returns them). Tensors may be DTensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.errors import CheckpointError


@dataclass(frozen=True)
class Fusion:
    """``fused`` in the checkpoint is ``torch.cat(parts, dim)`` in the parallel model."""

    fused: str
    parts: tuple[str, ...]
    dim: int = 0

    def prefixed(self, prefix: str) -> "Fusion":
        if not prefix:
            return self
        return Fusion(f"{prefix}.{self.fused}", tuple(f"{prefix}.{p}" for p in self.parts), self.dim)


def _full(t):
    """A plain tensor with the whole value of ``t`` (collectives for a DTensor).

    Mesh dimensions are gathered one at a time from the first (FSDP's data-parallel
    dimension, whose placement may be a strided shard on top of tensor parallelism).
    """
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return t
    placements = list(t.placements)
    for i, p in enumerate(placements):
        if not p.is_replicate():
            placements[i] = Replicate()
            t = t.redistribute(t.device_mesh, placements)
    return t.to_local()


def _like(full: torch.Tensor, ref):
    """``full`` laid out like ``ref``: a DTensor with ``ref``'s mesh and placements, or a plain copy."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(dtype=ref.dtype)
    if isinstance(ref, DTensor):
        # every rank holds the whole tensor: each takes its own shard, no communication
        return distribute_tensor(full.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
    return full.to(ref.device).clone()


class CheckpointLayout:
    """Converts between the parallel model's state and the plain (checkpoint) layout."""

    def __init__(self, fusions=()):
        self.fusions: list[Fusion] = list(fusions)
        self._part_of = {p: f for f in self.fusions for p in f.parts}
        self._by_fused = {f.fused: f for f in self.fusions}

    def __bool__(self) -> bool:
        return bool(self.fusions)

    def extend(self, fusions) -> None:
        self.__init__(self.fusions + list(fusions))

    # -- names ----------------------------------------------------------------------
    def plain_names(self, names) -> list[str]:
        """Parallel-model names -> checkpoint names, in order (a fusion sits where its first part was)."""
        out = []
        for n in names:
            f = self._part_of.get(n)
            if f is None:
                out.append(n)
            elif n == f.parts[0]:
                out.append(f.fused)
        return out

    def parallel_names(self, names) -> list[str]:
        out = []
        for n in names:
            f = self._by_fused.get(n)
            out.extend(f.parts if f is not None else [n])
        return out

    def _fold(self, entries: dict, fused_entry) -> dict:
        """``entries`` keyed by parallel names -> keyed by checkpoint names, in order.

        A fusion's parts become one entry, ``fused_entry(fusion, first part's value)``, where
        its first part was; the fusion is left out when that returns None.
        """
        out = {}
        for name, value in entries.items():
            f = self._part_of.get(name)
            if f is None:
                out[name] = value
            elif name == f.parts[0]:
                fused = fused_entry(f, value)
                if fused is not None:
                    out[f.fused] = fused
        return out

    # -- model state ----------------------------------------------------------------
    def fuse_state(self, state: dict, to_cpu: bool = False) -> dict:
        """Parallel-model state -> checkpoint layout (fused tensors are whole, plain tensors;
        on the CPU with ``to_cpu``)."""
        if not self:
            return state

        def fused(f, _):
            if not all(p in state for p in f.parts):
                return None
            whole = torch.cat([_full(state[p]) for p in f.parts], dim=f.dim)
            return whole.cpu() if to_cpu else whole

        return self._fold(state, fused)

    def placeholders(self, state: dict) -> dict:
        """The checkpoint-layout state to load into: ``state``'s own tensors, fused entries as whole empty tensors."""
        if not self:
            return state

        def placeholder(f, value):
            shapes = [state[p].shape for p in f.parts]
            shape = list(shapes[0])
            shape[f.dim] = sum(s[f.dim] for s in shapes)
            return torch.zeros(shape, dtype=value.dtype)

        return self._fold(state, placeholder)

    def split_state(self, loaded: dict, reference: dict) -> dict:
        """Checkpoint-layout ``loaded`` -> the parallel model's state, each part laid out like ``reference``."""
        out = {}
        for name, value in loaded.items():
            f = self._by_fused.get(name)
            if f is None:
                out[name] = value if name not in reference or not _needs_layout(value, reference[name]) \
                    else _like(_full(value), reference[name])
                continue
            missing = [p for p in f.parts if p not in reference]
            if missing:
                raise CheckpointError(f"cannot place checkpoint entry '{name}': the model has no {missing}")
            sizes = [reference[p].shape[f.dim] for p in f.parts]
            full = _full(value)
            if full.shape[f.dim] != sum(sizes):
                raise CheckpointError(f"checkpoint entry '{name}' has shape {tuple(full.shape)}, which does not split "
                                      f"into the model's {[tuple(reference[p].shape) for p in f.parts]}")
            for p, chunk in zip(f.parts, torch.split(full, sizes, dim=f.dim)):
                out[p] = _like(chunk, reference[p])
        return out

    # -- optimizer state ------------------------------------------------------------
    def fuse_optimizer_state(self, osd: dict, to_cpu: bool = False) -> dict:
        if not self or "state" not in osd:
            return osd
        state = osd["state"]

        def fused(f, _):
            if not all(p in state for p in f.parts):
                return None
            whole = _fuse_param_state([state[p] for p in f.parts], f.dim)
            return {k: v.cpu() if to_cpu and isinstance(v, torch.Tensor) else v for k, v in whole.items()}

        new_state = self._fold(state, fused)
        groups = [{**g, "params": self.plain_names(g["params"])} for g in osd["param_groups"]]
        return {**osd, "state": new_state, "param_groups": groups}

    def optimizer_placeholders(self, osd: dict) -> dict:
        if not self:
            return osd
        state = osd["state"]
        new_state = self._fold(state, lambda f, value: {
            k: (v.detach().clone() if v.dim() == 0 else torch.zeros(_fused_shape([state[p][k] for p in f.parts], f.dim), dtype=v.dtype))
            for k, v in value.items() if isinstance(v, torch.Tensor)
        })
        groups = [{**g, "params": self.plain_names(g["params"])} for g in osd["param_groups"]]
        return {**osd, "state": new_state, "param_groups": groups}

    def split_optimizer_state(self, loaded: dict, reference: dict) -> dict:
        """Checkpoint-layout optimizer state -> the parallel model's, tensors laid out like ``reference``'s."""
        ref_state = reference.get("state", {})
        new_state = {}
        for name, value in loaded["state"].items():
            f = self._by_fused.get(name)
            if f is None:
                ref = ref_state.get(name, {})
                new_state[name] = {k: (_like(_full(v), ref[k]) if k in ref and isinstance(v, torch.Tensor)
                                       and _needs_layout(v, ref[k]) else v) for k, v in value.items()}
                continue
            for i, p in enumerate(f.parts):
                ref = ref_state.get(p, {})
                part = {}
                for k, v in value.items():
                    if not isinstance(v, torch.Tensor):
                        part[k] = v
                        continue
                    if v.dim() == 0:  # e.g. Adam's step: one tensor per parameter (the optimizer increments it in place)
                        part[k] = _like(_full(v), ref[k]) if k in ref else v.clone()
                        continue
                    full = _full(v)
                    n = len(f.parts)
                    if full.shape[f.dim] == 1:  # a statistic shared by the whole fused row range (Adafactor's column factor)
                        chunk = full
                    elif full.shape[f.dim] % n == 0:
                        chunk = torch.chunk(full, n, dim=f.dim)[i]
                    else:
                        raise CheckpointError(f"optimizer state '{k}' of '{name}' with shape {tuple(full.shape)} "
                                              f"cannot be split into {n} parts")
                    part[k] = _like(chunk, ref[k]) if k in ref else chunk
                new_state[p] = part
        groups = [{**g, "params": self.parallel_names(g["params"])} for g in loaded["param_groups"]]
        return {**loaded, "state": new_state, "param_groups": groups}


def _needs_layout(value, ref) -> bool:
    from torch.distributed.tensor import DTensor

    if not isinstance(value, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return False
    if isinstance(ref, DTensor):
        return not (isinstance(value, DTensor) and value.placements == ref.placements
                    and value.device_mesh == ref.device_mesh)
    return isinstance(value, DTensor)


def _fused_shape(tensors, dim: int) -> list[int]:
    shape = list(tensors[0].shape)
    if shape[dim] != 1:
        shape[dim] = sum(t.shape[dim] for t in tensors)
    return shape


def _fuse_param_state(states: list[dict], dim: int) -> dict:
    """One parameter's optimizer state from its parts' states (Adam moments concatenate; step is shared)."""
    out = {}
    for k, v0 in states[0].items():
        if not isinstance(v0, torch.Tensor):
            out[k] = v0
            continue
        values = [_full(s[k]) for s in states]
        if values[0].dim() == 0:
            out[k] = values[0]
        elif values[0].shape[dim] == 1:  # e.g. Adafactor's column second moment: a mean over rows
            out[k] = torch.stack(values).mean(0)
        else:
            out[k] = torch.cat(values, dim=dim)
    return out


def optimizer_state_to_ids(osd: dict) -> dict:
    """FQN-keyed optimizer state -> the integer-keyed form ``torch.optim.Optimizer.load_state_dict`` takes.

    Ids follow the order of the parameter groups, as ``Optimizer.state_dict()`` numbers them.
    """
    ids: dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        params = []
        for fqn in g["params"]:
            ids.setdefault(fqn, len(ids))
            params.append(ids[fqn])
        groups.append({**g, "params": params})
    state = {ids[fqn]: v for fqn, v in osd["state"].items() if fqn in ids}
    return {"state": state, "param_groups": groups}


def optimizer_state_to_fqns(osd: dict, fqns_in_order: list[str]) -> dict:
    """Integer-keyed optimizer state (a single-file checkpoint) -> FQN-keyed, ids in ``fqns_in_order`` order."""
    n = sum(len(g["params"]) for g in osd["param_groups"])
    if n != len(fqns_in_order):
        raise CheckpointError(f"the checkpoint's optimizer has {n} parameters but this model's has {len(fqns_in_order)}: "
                              f"it was written for another model or optimizer setup")
    by_id = {}
    groups = []
    i = 0
    for g in osd["param_groups"]:
        names = []
        for pid in g["params"]:
            by_id[pid] = fqns_in_order[i]
            names.append(fqns_in_order[i])
            i += 1
        groups.append({**g, "params": names})
    state = {by_id[k]: v for k, v in osd["state"].items() if k in by_id}
    return {"state": state, "param_groups": groups}
