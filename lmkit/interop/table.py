"""Conversion tables: one list of rules per family, read lmkit -> HF (export) or HF -> lmkit (import).

A rule pairs lmkit tensor names with Hugging Face tensor names and holds both directions of
its transform, so that export and import can never disagree:

* :class:`Rename` one tensor under another name (optionally transposed: GPT-2's Conv1D);
* :class:`Split` one fused lmkit tensor (qkv, kv) <-> several HF tensors cut along dim 0;
* :class:`PadRows` lmkit rows <-> HF rows behind ``n`` unused leading rows (BART's position offset 2);
* :class:`Zeros` an HF tensor lmkit has no place for, which must be zero (BART's final_logits_bias,
  GPT-2 biases of a ``bias=false`` model): written as zeros, checked on import;
* :class:`Tied` an HF name that repeats another tensor (tied embeddings, ALBERT's shared layers):
  not written (safetensors refuses shared tensors; transformers re-ties), and on import accepted
  only when it equals the tensor it repeats. :class:`LmkitAlias` is the same on lmkit's side.

Names may hold ``{i}``, a layer slot that :func:`expand` fills in. :func:`convert` is strict:
every input tensor is used exactly once and every output tensor is produced, else one
:class:`~lmkit.errors.LmkitError` names the leftovers and the missing ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from lmkit.errors import LmkitError


class ConversionError(LmkitError):
    """A checkpoint does not fit the conversion table of its family."""


@dataclass
class Rule:
    lm: tuple[str, ...]
    hf: tuple[str, ...]

    def to_hf(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def from_hf(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def fill(self, **slots) -> "Rule":
        import copy

        rule = copy.copy(self)
        rule.lm = tuple(n.format(**slots) for n in self.lm)
        rule.hf = tuple(n.format(**slots) for n in self.hf)
        return rule


class Rename(Rule):
    def __init__(self, hf: str, lm: str, transpose: bool = False):
        super().__init__((lm,), (hf,))
        self.transpose = transpose

    def to_hf(self, tensors):
        t = tensors[0]
        return [t.t().contiguous() if self.transpose else t]

    def from_hf(self, tensors):
        t = tensors[0]
        return [t.t().contiguous() if self.transpose else t]


class Split(Rule):
    """lmkit's fused projection (rows q|k|v, or k|v) <-> the HF projections, one per part."""

    def __init__(self, hf: tuple[str, ...], lm: str):
        super().__init__((lm,), tuple(hf))

    def to_hf(self, tensors):
        return [t.contiguous() for t in tensors[0].chunk(len(self.hf), dim=0)]

    def from_hf(self, tensors):
        return [torch.cat(tensors, dim=0)]


class PadRows(Rule):
    """HF holds ``n`` extra leading rows (unused: BART looks positions up at ``pos + 2``)."""

    def __init__(self, hf: str, lm: str, n: int):
        super().__init__((lm,), (hf,))
        self.n = n

    def to_hf(self, tensors):
        t = tensors[0]
        return [torch.cat([t.new_zeros((self.n, *t.shape[1:])), t], dim=0)]

    def from_hf(self, tensors):
        return [tensors[0][self.n:].contiguous()]


class Zeros(Rule):
    """An HF tensor of ``shape`` that lmkit's model does not have: zeros on export, checked on import."""

    def __init__(self, hf: str, shape, why: str):
        super().__init__((), (hf,))
        self.shape, self.why = tuple(shape), why

    def to_hf(self, tensors, dtype=torch.float32):
        return [torch.zeros(self.shape, dtype=dtype)]

    def from_hf(self, tensors):
        t = tensors[0]
        if tuple(t.shape) != self.shape:
            raise ConversionError(f"tensor '{self.hf[0]}' has shape {list(t.shape)}, expected {list(self.shape)}")
        if torch.count_nonzero(t):
            raise ConversionError(f"tensor '{self.hf[0]}' is not zero, but {self.why}: this model cannot be "
                                  f"imported without changing its outputs")
        return []


class Tied(Rule):
    """HF name ``hf`` repeats HF tensor ``target`` (tied); optional on import, checked equal when present.

    Not written, unless ``write`` (a copy: some transformers versions, e.g. 4.46 for ALBERT's
    ``predictions.decoder.bias``, re-tie from the repeat and would lose the target's values).
    """

    def __init__(self, hf: str, target: str, write: bool = False):
        super().__init__((), (hf,))
        self.target, self.write = target, write

    def fill(self, **slots):
        rule = super().fill(**slots)
        rule.target = self.target.format(**slots)
        return rule


class LmkitAlias(Rule):
    """lmkit name ``lm`` repeats lmkit tensor ``target`` (a shared module): checked on export, filled on import."""

    def __init__(self, lm: str, target: str):
        super().__init__((lm,), ())
        self.target = target

    def fill(self, **slots):
        rule = super().fill(**slots)
        rule.target = self.target.format(**slots)
        return rule


def expand(rules: list[Rule], n: int, slot: str = "i") -> list[Rule]:
    """The rules for layers ``0..n-1`` (names with ``{i}``)."""
    return [r.fill(**{slot: k}) for k in range(n) for r in rules]


@dataclass
class Table:
    """The rules of one model, plus HF names to ignore on import (buffers of older files)."""

    rules: list[Rule]
    ignore_hf: tuple[str, ...] = ()  # regular expressions

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore_hf)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_hf(table: Table, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """lmkit tensors -> HF tensors; every lmkit tensor used exactly once."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    dtype = next(iter(state.values())).dtype if state else torch.float32
    for rule in table.rules:
        if isinstance(rule, Tied):
            continue
        if isinstance(rule, LmkitAlias):
            name = rule.lm[0]
            if name in state and rule.target in state and not _same(state[name], state[rule.target]):
                raise ConversionError(f"{what}: '{name}' should be the very tensor '{rule.target}' (shared), "
                                      f"but they differ")
            if name in state:
                used.add(name)
            continue
        absent = [n for n in rule.lm if n not in state]
        if absent:
            missing += absent
            continue
        used.update(rule.lm)
        tensors = rule.to_hf([state[n] for n in rule.lm], dtype) if isinstance(rule, Zeros) else \
            rule.to_hf([state[n] for n in rule.lm])
        for name, t in zip(rule.hf, tensors):
            out[name] = t
    for rule in table.rules:
        if isinstance(rule, Tied) and rule.write and rule.target in out:
            out[rule.hf[0]] = out[rule.target].clone()
    _refuse_unused(what, "tensors the table does not map", set(state) - used,
                   "tensors the table expects but the checkpoint lacks", missing)
    return out


def from_hf(table: Table, state: dict[str, torch.Tensor], what: str,
            allow_missing: Callable[[str], bool] | None = None,
            unexpected: list[str] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF tensors -> lmkit tensors; every HF tensor used exactly once (tied repeats checked, old buffers ignored).

    ``allow_missing(lm_name)``: lmkit tensors that may be absent (heads initialised fresh); returns the
    converted tensors and the lmkit names that were absent that way. ``unexpected``: a list that
    receives the HF tensors no rule uses, instead of an error (a weights-only start lists them).
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    fresh: list[str] = []
    aliases: list[LmkitAlias] = []
    for rule in table.rules:
        if isinstance(rule, Tied):
            name = rule.hf[0]
            if name in state:
                used.add(name)
                if rule.target in state and not _same(state[name], state[rule.target]):
                    raise ConversionError(f"{what}: '{name}' is tied to '{rule.target}' in this configuration, but "
                                          f"the file holds different values for them")
            continue
        if isinstance(rule, LmkitAlias):
            aliases.append(rule)
            continue
        absent = [n for n in rule.hf if n not in state]
        if absent:
            if allow_missing is not None and rule.lm and all(allow_missing(n) for n in rule.lm):
                fresh += list(rule.lm)
            elif isinstance(rule, Zeros):
                pass  # e.g. BART's final_logits_bias, often left out of files: zeros either way
            else:
                missing += absent
            continue
        used.update(rule.hf)
        for name, t in zip(rule.lm, rule.from_hf([state[n] for n in rule.hf])):
            out[name] = t
    for rule in aliases:
        if rule.target in out:
            out[rule.lm[0]] = out[rule.target]
    leftovers = {n for n in set(state) - used if not table.ignored(n)}
    if unexpected is not None:
        unexpected.extend(sorted(leftovers))
        leftovers = set()
    _refuse_unused(what, "unexpected tensors", leftovers, "missing tensors", missing)
    return out, fresh


def _refuse_unused(what: str, leftover_label: str, leftovers, missing_label: str, missing) -> None:
    """One ConversionError naming the tensors no rule used and those a rule needed but did not find."""
    parts = [f"{label}: {_names(names)}" for label, names in ((leftover_label, leftovers), (missing_label, missing))
             if names]
    if parts:
        raise ConversionError(f"{what}: " + "; ".join(parts))
