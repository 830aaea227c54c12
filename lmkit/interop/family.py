"""What each family module provides, and the config map read two ways."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from lmkit.errors import ConfigError
from lmkit.interop.table import Table

#: lmkit activation name <-> HF activation name (HF's "gelu" is the exact erf GELU)
ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
#: other HF names computing the very same function
HF_ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu", "gelu_python": "gelu_exact"}


def activation_to_hf(name: str) -> str:
    return ACTIVATIONS[name]


def activation_from_hf(name: str, family: str) -> str:
    for lm, hf in ACTIVATIONS.items():
        if hf == name:
            return lm
    if name in HF_ACTIVATION_ALIASES:
        return HF_ACTIVATION_ALIASES[name]
    raise ConfigError(f"{family}: activation '{name}' has no lmkit equivalent (lmkit has "
                      f"{', '.join(ACTIVATIONS.values())} in HF's names)")


@dataclass
class Field:
    """HF config key <-> lmkit config field; ``to_hf``/``from_hf`` convert the value (identity by default)."""

    hf: str
    lm: str | None
    to_hf: Callable[[Any, Any], Any] | None = None  # (value, lmkit cfg) -> HF value
    from_hf: Callable[[Any, dict], Any] | None = None  # (value, HF config dict) -> lmkit value


@dataclass
class Family:
    """One exportable lmkit architecture and its Hugging Face counterpart.

    ``check(cfg, heads)`` refuses a configuration HF cannot hold (one line); ``table(cfg, heads)``
    the tensor rules; ``fields`` the config map; ``fixed`` HF config values lmkit's model
    implies (checked on import: another value is refused, with ``fixed_why``); ``architecture(heads)``
    the HF class written into config.json. ``heads``: objective heads present besides the model
    (``{"pair"}`` for NSP/SOP).
    """

    name: str
    model_type: str
    config_cls: type
    model_cls: type
    fields: list[Field]
    fixed: dict[str, Any]
    check: Callable[[Any, set], None]
    table: Callable[[Any, set], Table]
    architecture: Callable[[set], str]
    auto_class: str
    extra_hf: Callable[[Any, Any], dict] = lambda cfg, tok: {}
    from_hf_extra: Callable[[dict, dict], dict] = lambda hf, state: {}  # (HF config, HF tensors) -> lmkit fields
    accepted: dict[str, tuple] = field(default_factory=dict)  # HF keys whose values must be one of these
    pair_hf: str | None = None  # HF name of the sentence-pair (NSP/SOP) head's weight
    #: (cfg, heads) -> {lmkit name prefix: why} of model tensors the HF class has no place for and that
    #: carry nothing learned (left out of the export, and listed)
    left_out: Callable[[Any, set], dict] = lambda cfg, heads: {}

    def has_pair_tensor(self, state: dict) -> bool:
        return self.pair_hf is not None and self.pair_hf in state

    def hf_config(self, cfg, tokens: dict[str, int | None], heads: set) -> dict:
        out: dict[str, Any] = {"architectures": [self.architecture(heads)], "model_type": self.model_type}
        for f in self.fields:
            value = getattr(cfg, f.lm) if f.lm else None
            out[f.hf] = f.to_hf(value, cfg) if f.to_hf else value
        out.update(self.fixed)
        out.update(self.extra_hf(cfg, tokens))
        out.update({k: v for k, v in tokens.items() if v is not None})
        out["lmkit"] = {"architecture": self.name, "config": _plain(dataclasses.asdict(cfg)),
                        "heads": sorted(heads)}
        return out

    def lm_config(self, hf: dict, state: dict | None = None):
        """The lmkit config of an HF config.json (refusing what lmkit's model cannot compute)."""
        for key, value in self.fixed.items():
            if key in hf and hf[key] != value and key not in self.accepted:
                raise ConfigError(f"{self.model_type} config.json has {key}={hf[key]!r}; lmkit's {self.name} "
                                  f"computes only {key}={value!r}")
        for key, values in self.accepted.items():
            if key in hf and hf[key] not in values:
                raise ConfigError(f"{self.model_type} config.json has {key}={hf[key]!r}; lmkit's {self.name} supports "
                                  f"{' or '.join(repr(v) for v in values)}")
        kwargs: dict[str, Any] = {}
        hint = hf.get("lmkit") if isinstance(hf.get("lmkit"), dict) else None
        if hint and hint.get("architecture") == self.name:  # an lmkit export: its own options (init, bias, ...)
            names = {f.name for f in dataclasses.fields(self.config_cls)}
            kwargs.update({k: v for k, v in hint.get("config", {}).items() if k in names})
        for f in self.fields:
            if f.lm is None or f.hf not in hf:
                continue
            kwargs[f.lm] = f.from_hf(hf[f.hf], hf) if f.from_hf else hf[f.hf]
        kwargs.update(self.from_hf_extra(hf, state or {}))
        kwargs["name"] = self.name
        return self.config_cls(**kwargs)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
