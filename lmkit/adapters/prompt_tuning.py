"""Prompt tuning (Lester et al. 2021): ``length`` trainable embeddings prepended to every input, the model frozen.

``model.prompt_tuning.length=20`` (the ``prompt_tuning`` model extension) on a decoder: the
token embedding becomes a :class:`PromptedEmbedding` holding the soft prompt [length, d_model]
next to its own weight (parameter names unchanged, plus ``<embedding>.prompt``). Hooks on the
model make every call see ``length`` extra leading positions:

* before the call, ``input_ids`` [B, T] become [B, k+T] with the ids ``-1..-k`` in front (the
  embedding looks those up in the prompt), ``padding_mask`` marks them real, and an
  ``attn_mask`` [B, T, T] grows to [B, k+T, k+T]: the prompt attends causally to itself and
  every token sees the whole prompt plus what it saw before;
* after the call, the hidden states of the prompt positions are dropped, so the objective
  sees [B, T, D] as before and its loss never covers the soft prompt.

Positions: the prompt takes positions ``0..k-1`` and the text follows (so ``data.seq_len + k``
must fit ``model.max_seq_len``). Packed documents (``document_ids``) and cached generation
(``input_pos``) are refused. ``length=0`` (the default) leaves the model untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.errors import ConfigError

INITS = ("vocab", "random")


@dataclass
class PromptTuningConfig:
    """Prompt-tuning settings (``model.prompt_tuning.*``); off while ``length`` is 0.

    ``length``: soft-prompt positions. ``init``: ``vocab`` copies the embeddings of randomly
    drawn vocabulary tokens (Lester et al.'s better-performing choice, so the prompt starts on
    the scale of real inputs), ``random`` draws N(0, std of the embedding). ``train``: model
    parameters that also train (names, dotted suffixes or regular expressions; default none).
    """

    length: int = 0
    init: str = "vocab"
    train: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise ConfigError(f"model.prompt_tuning.length must be a whole number >= 0 (0 = off), got {self.length!r}")
        if self.init not in INITS:
            raise ConfigError(f"model.prompt_tuning.init must be one of {', '.join(INITS)}, got {self.init!r}")


class PromptedEmbedding(nn.Embedding):
    """A token embedding that maps the ids ``-1..-k`` to the rows of ``prompt`` [k, D] (``-1`` -> row 0)."""

    def __init__(self, base: nn.Embedding, length: int, init: str = "vocab"):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight  # the same Parameter: tied output embeddings stay tied
        with torch.no_grad():
            if init == "vocab":
                rows = torch.randint(0, base.num_embeddings, (length,), device=base.weight.device)
                start = base.weight[rows].clone()
            else:
                start = torch.randn(length, base.embedding_dim, device=base.weight.device,
                                    dtype=base.weight.dtype) * base.weight.std()
        self.prompt = nn.Parameter(start)

    def forward(self, ids):
        out = F.embedding(ids.clamp(min=0), self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        soft = self.prompt[(-ids - 1).clamp(min=0, max=self.prompt.shape[0] - 1)]
        return torch.where((ids < 0)[..., None], soft.to(out.dtype), out)


def _token_embedding_name(model: nn.Module) -> str:
    mods = getattr(model, "embedding_modules", None)
    emb = mods()[0] if callable(mods) else None
    for name, module in model.named_modules():
        if module is emb:
            return name
    raise ConfigError(f"prompt tuning needs the model's token embedding (embedding_modules()[0]); "
                      f"{type(model).__name__} does not name one")


def _extend_attn_mask(attn_mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, T] (or [T, T]) True = may attend -> [B, k+T, k+T] with the prompt in front."""
    if attn_mask.dim() == 2:
        attn_mask = attn_mask[None]
    B, T, _ = attn_mask.shape
    out = torch.zeros(B, k + T, k + T, dtype=torch.bool, device=attn_mask.device)
    out[:, :k, :k] = torch.ones(k, k, dtype=torch.bool, device=attn_mask.device).tril()
    out[:, k:, :k] = True
    out[:, k:, k:] = attn_mask.bool()
    return out


def add_prompt_hooks(model: nn.Module, k: int) -> None:
    """Prepend ``k`` prompt ids to every call of ``model`` and drop their outputs afterwards."""

    def before(module, args, kwargs):
        if kwargs.get("input_pos") is not None:
            raise ConfigError("a prompt-tuned model cannot decode with a KV cache (input_pos); "
                              "generation from prompt-tuning runs is not supported")
        if kwargs.get("document_ids") is not None:
            raise ConfigError("prompt tuning does not work with packed documents (document_ids); "
                              "set the objective's document_mask=false")
        ids = args[0] if args else kwargs.pop("input_ids")
        B = ids.shape[0]
        prompt = -torch.arange(1, k + 1, device=ids.device).expand(B, k)
        ids = torch.cat([prompt.to(ids.dtype), ids], dim=1)
        if kwargs.get("padding_mask") is not None:
            pad = kwargs["padding_mask"]
            kwargs["padding_mask"] = torch.cat([torch.ones(B, k, dtype=pad.dtype, device=pad.device), pad], dim=1)
        if kwargs.get("attn_mask") is not None:
            kwargs["attn_mask"] = _extend_attn_mask(kwargs["attn_mask"], k)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([tt[:, :1].expand(B, k), tt], dim=1)
        return (ids, *args[1:]), kwargs

    def after(module, args, kwargs, output):
        return output[:, k:]

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, verbose: bool = False) -> nn.Module:
    """Give ``model`` (a decoder) a soft prompt of ``cfg.length`` positions and freeze all else but ``cfg.train``."""
    from lmkit.adapters.lora import _matches, did_you_mean

    if cfg.length == 0:
        return model
    if getattr(model, "kind", None) != "decoder":
        raise ConfigError(f"model.prompt_tuning works on decoders (gpt, llama); this model is a "
                          f"{getattr(model, 'kind', type(model).__name__)}")
    if getattr(model, "_lmkit_prompt_length", 0):
        raise ConfigError("prompt tuning was already applied to this model")
    name = _token_embedding_name(model)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child,
            PromptedEmbedding(model.get_submodule(name), cfg.length, cfg.init))
    add_prompt_hooks(model, cfg.length)
    model._lmkit_prompt_length = cfg.length
    params = dict(model.named_parameters())
    keep = {f"{name}.prompt"}
    for pattern in cfg.train:
        found = [n for n in params if _matches(pattern, n)]
        if not found:
            raise ConfigError(f"model.prompt_tuning.train: '{pattern}' matches no parameter of this "
                              f"{type(model).__name__}.{did_you_mean(pattern, params)}")
        keep.update(found)
    for n, p in params.items():
        p.requires_grad_(n in keep)
    if verbose:
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        print(f"lmkit: prompt_tuning: {cfg.length} soft-prompt positions; {trainable:,} of the model's "
              f"{sum(p.numel() for p in params.values()):,} parameters train", flush=True)
    return model


__all__ = ["PromptTuningConfig", "PromptedEmbedding", "apply_prompt_tuning"]
