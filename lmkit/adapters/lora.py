"""LoRA (Hu et al. 2021): a frozen Linear layer plus a trainable low-rank update, ``W + (alpha/r)·B·A``.

``model.lora.r=8 model.lora.alpha=16 model.lora.targets=[...]`` adapts the chosen Linear
layers of any built architecture (the ``lora`` model extension, applied in
``lmkit_configure_model`` before compilation, ``init_from`` and sharding). The whole model is
frozen except the adapters and the parameters named by ``model.lora.train``; the objective's
own heads (built after the model) stay trainable.

Written here rather than with PEFT: PEFT moves every adapted layer's tensors to
``<layer>.base_layer.weight``, so ``init_from`` (which loads a pretrained run or HF directory
by parameter name), the export tables, checkpoint consolidation and the fsdp/tp plans, which
all name ``<layer>.weight``, would no longer find them. :class:`LoRALinear` keeps the Linear's
own ``weight``/``bias`` and adds ``lora_A``/``lora_B`` beside them; the tests check its forward
and merge against PEFT's ``LoraLayer``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.errors import ConfigError, did_you_mean

#: ``model.lora.targets`` keywords: the attention input projections / every Linear inside the transformer blocks
ATTENTION_NAMES = ("qkv", "q", "k", "v", "kv")
KEYWORDS = ("attention", "all-linear")


@dataclass
class LoRAConfig:
    """LoRA settings (``model.lora.*``); LoRA is off while ``r`` is unset.

    ``r``: the adapters' rank (>= 1). ``alpha``: the update is scaled by ``alpha / r`` (so that
    changing ``r`` does not change the initial learning dynamics, as in the paper).
    ``dropout``: dropout on the adapter's input. ``targets``: which Linear layers get an
    adapter: module names (``blocks.0.attn.qkv``), dotted suffixes (``qkv``, ``attn.proj``),
    regular expressions matched against the whole name, or the keywords ``attention`` (the
    attention input projections: ``qkv``/``q``/``k``/``v``/``kv``) and ``all-linear`` (every
    Linear layer of the transformer blocks). ``train``: model parameters that stay trainable
    besides the adapters (names, suffixes or regular expressions, e.g. ``[ln_f.weight]``).
    """

    r: Optional[int] = None
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention"])
    train: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ConfigError(f"model.lora.r must be a whole number >= 1 (the adapters' rank), got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be > 0 (the update is scaled by alpha/r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.r is not None and not self.targets:
            raise ConfigError("model.lora.targets is empty: name the Linear layers to adapt (e.g. [attention], "
                              "[qkv,attn.proj] or [all-linear])")

    @property
    def enabled(self) -> bool:
        return self.r is not None


class LoRALinear(nn.Linear):
    """``y = x·Wᵀ + b + (alpha/r)·dropout(x)·Aᵀ·Bᵀ`` with ``W``/``b`` those of the Linear it replaces.

    ``lora_A`` [r, in] starts as PEFT/the paper do (Kaiming-uniform), ``lora_B`` [out, r] at
    zero, so a fresh adapter leaves the layer's output unchanged. Parameter names are the
    Linear's (``weight``, ``bias``) plus ``lora_A``/``lora_B``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: tying and init_from keep working
        self.register_parameter("bias", base.bias)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        low = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # scaled at rank r: the cheap side
        return F.linear(x, self.weight, self.bias) + F.linear(low, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r)·B·A`` [out, in]: what merging adds to ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear with ``weight + (alpha/r)·B·A`` (new tensors; this layer is unchanged)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


# -- choosing layers ------------------------------------------------------------------------------


def _matches(pattern: str, name: str) -> bool:
    """A name, a dotted suffix of it, or a regular expression matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def short_name(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``attn.qkv``: the part after the last numeric component (layer index)."""
    parts = name.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last + 1:]) or name


def _output_head_ids(model: nn.Module) -> set[int]:
    """Weights the objectives read directly (``output_embedding()``, fused into the loss): never adapted."""
    get = getattr(model, "output_embedding", None)
    try:
        return {id(get())} if callable(get) else set()
    except Exception:
        return set()


def resolve_targets(model: nn.Module, targets: list[str], what: str = "model.lora.targets") -> list[str]:
    """Names of the Linear layers ``targets`` selects; a ConfigError names an entry that selects none."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    heads = _output_head_ids(model)
    in_blocks = set()
    if hasattr(model, "transformer_blocks"):
        ids = {id(b) for b in model.transformer_blocks()}
        block_names = [n for n, m in model.named_modules() if id(m) in ids]
        in_blocks = {n for n in linears if any(n.startswith(b + ".") for b in block_names)}
    chosen: dict[str, None] = {}
    for entry in targets:
        if entry == "attention":
            found = [n for n in linears if n.rsplit(".", 1)[-1] in ATTENTION_NAMES]
        elif entry == "all-linear":
            found = [n for n in linears if n in in_blocks]
        else:
            found = [n for n in linears if _matches(entry, n)]
            if not found:
                other = [n for n, _ in model.named_modules() if n and _matches(entry, n)]
                if other:
                    kind = type(dict(model.named_modules())[other[0]]).__name__
                    raise ConfigError(f"{what}: '{entry}' selects {other[0]} ({kind}), not a Linear layer; LoRA "
                                      f"adapts Linear layers: {', '.join(_choices(linears))}")
        found = [n for n in found if id(linears[n].weight) not in heads]
        if not found:
            choices = _choices({n: m for n, m in linears.items() if id(m.weight) not in heads})
            raise ConfigError(f"{what}: '{entry}' matches no Linear layer of this {type(model).__name__}."
                              f"{did_you_mean(entry, choices + [c.rsplit('.', 1)[-1] for c in choices])} Its Linear layers: {', '.join(choices)} "
                              f"(or the keywords {', '.join(KEYWORDS)}; the output head is never adapted)")
        chosen.update(dict.fromkeys(found))
    return list(chosen)


def _choices(linears) -> list[str]:
    return list(dict.fromkeys(short_name(n) for n in linears))


# -- applying, freezing, merging ------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, verbose: bool = False) -> list[str]:
    """Put a :class:`LoRALinear` in place of each target layer and freeze everything else but ``cfg.train``.

    Returns the adapted layers' names. Raises ConfigError for targets or ``train`` patterns
    that match nothing.
    """
    names = resolve_targets(model, list(cfg.targets))
    for name in names:
        base = model.get_submodule(name)
        _set_submodule(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout))
    params = dict(model.named_parameters())
    keep = set()
    for pattern in cfg.train:
        found = [n for n in params if _matches(pattern, n)]
        if not found:
            raise ConfigError(f"model.lora.train: '{pattern}' matches no parameter of this {type(model).__name__}."
                              f"{did_you_mean(pattern, params)} (give names such as "
                              f"{', '.join(list(params)[:3])}, suffixes or regular expressions)")
        keep.update(found)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"lmkit: lora: r={cfg.r} on {len(names)} layers ({', '.join(_choices(names))}); "
              f"{trainable:,} of the model's {total:,} parameters train ({100 * trainable / total:.2f}%)", flush=True)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` of ``model`` (in place) by a plain Linear holding ``W + (alpha/r)·B·A``.

    The model's parameter names become the base architecture's again (export, HF tables).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_submodule(model, name, module.merged())
    return model


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "resolve_targets"]
