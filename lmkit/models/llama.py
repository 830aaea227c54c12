"""Llama-family decoder: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

The layout follows Hugging Face's ``LlamaForCausalLM`` so that export needs no permutation:
RoPE in the half-split layout (``rotate_half``: dimension ``j`` pairs with ``j + head_dim/2``,
not Meta's interleaved pairs), RMSNorm before each sub-layer and at the end, an MLP
``proj(silu(gate(x)) * fc(x))`` (HF's gate_proj/up_proj/down_proj) and separate ``q``/``k``/``v``
projections, ``k`` and ``v`` with ``n_kv_head`` heads shared by groups of query heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import (
    GatedMLP,
    apply_documents,
    build_attention_bias,
    causal_mask_at,
    static_causal_mask,
)
from lmkit.models.local_attention import banded_self_attention, mark_banded_layers


def llama_ffn_size(d_model: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4·d_model (times ``multiplier``), rounded up to ``multiple_of``.

    d_model=4096 gives 11008 (Llama 2 7B); 2048 with multiplier 1.5 gives 8192 (Llama 3.2 1B).
    """
    hidden = int(2 * 4 * d_model / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class LlamaConfig(ArchitectureConfig):
    """Sizes and options of :class:`Llama`. ``vocab_size`` None = taken from the tokenizer.

    ``n_kv_head`` None = ``n_head`` (multi-head attention); fewer = grouped-query attention.
    ``d_ff`` None = :func:`llama_ffn_size` of ``d_model`` with ``ffn_multiple_of``.
    """

    name: str = "llama"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    d_ff: int | None = None
    ffn_multiple_of: int = 256
    max_seq_len: int = 256
    vocab_size: int | None = None
    dropout: float = 0.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False
    attention: str = "dense"  # or "alternating_local": odd layers banded (lmkit.models.local_attention)
    attention_window: int | None = None  # alternating_local: a banded position sees the previous W, itself included

    def __post_init__(self):
        from lmkit.config.checks import check_int, check_positive
        from lmkit.errors import ConfigError
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, LlamaConfig)
        check_architecture(self)
        check_int("model.n_kv_head", self.n_kv_head, minimum=1, optional=True,
                  hint=" (null = model.n_head: multi-head attention)")
        check_int("model.ffn_multiple_of", self.ffn_multiple_of, minimum=1)
        check_positive("model.rope_theta", self.rope_theta, " (the RoPE base, e.g. 10000 or 500000)")
        check_positive("model.rms_norm_eps", self.rms_norm_eps)
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}: each key/value "
                f"head serves a group of n_head / n_kv_head query heads. Use a model.n_kv_head that divides "
                f"{self.n_head} (e.g. {', '.join(str(d) for d in range(1, self.n_head + 1) if self.n_head % d == 0)}).")
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model / model.n_head = {self.head_dim} is odd: rotary positions rotate pairs of "
                f"dimensions, so each head needs an even size. Choose d_model and n_head with an even quotient.")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else int(self.n_kv_head)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_size(self) -> int:
        return int(self.d_ff) if self.d_ff is not None else llama_ffn_size(self.d_model, self.ffn_multiple_of)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, 1, T, head_dim] of the rotary angles (fp32), HF's half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, head_dim] by the angles whose cos/sin are given (computed in x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with rotary positions and ``n_kv_head`` key/value heads (GQA; MQA at 1).

    Keys and values are repeated to the query heads (``repeat_interleave``: head ``h`` reads
    kv head ``h // (n_head / n_kv_head)``, as HF's ``repeat_kv``) and go through
    ``F.scaled_dot_product_attention``. ``kv_cache`` (generation only, None in training): a
    :class:`~lmkit.models.layers.KVCache` of ``n_kv_head`` heads that ``input_pos`` calls write
    the rotated keys and values to (before the repeat, so GQA keeps its smaller cache).
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.q = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.k = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)
        self.dropout = dropout
        self.kv_cache = None
        self.window: int | None = None  # set by the model: a banded layer (lmkit.models.local_attention)

    def forward(self, x, cos, sin, mask=None, is_causal=True, input_pos=None):
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q(x).view(B, T, -1, hd).transpose(1, 2)
        k = self.k(x).view(B, T, -1, hd).transpose(1, 2)
        v = self.v(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        rep = q.shape[1] // k.shape[1]  # local head counts (tensor parallelism splits both alike)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.window is not None:  # a banded layer of model.attention=alternating_local
            y = banded_self_attention(q, k, v, self.window, mask, self.dropout if self.training else 0.0)
            return self.proj(y.transpose(1, 2).reshape(B, T, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.attn = GroupedQueryAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dropout)
        self.ln_2 = nn.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.ffn_size, "silu", cfg.dropout, bias=False)

    def forward(self, x, cos, sin, mask=None, is_causal=True, input_pos=None):
        x = x + self.attn(self.ln_1(x), cos, sin, mask=mask, is_causal=is_causal, input_pos=input_pos)
        return x + self.mlp(self.ln_2(x))


class Llama(nn.Module):
    """Decoder-only transformer of the Llama family. Causal by default; ``attn_mask`` allows prefix LM.

    ``document_ids`` [B, T] (optional) keeps attention inside each packed document and
    restarts the rotary positions at every document.
    """

    kind = "decoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "document_ids"})  # token_type_ids: taken, ignored
    logits_are_linear = True  # logits(h) == h @ output_embedding().T: objectives may fuse head and loss
    static_kv_cache = True  # forward_cached/_forward_cached take tensor positions (lmkit.generation cache=static)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.head_dim, self.rope_theta = cfg.head_dim, float(cfg.rope_theta)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        mark_banded_layers(self.blocks, cfg)
        self.ln_f = nn.RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer)

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None, document_ids=None):
        T = input_ids.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.max_seq_len}")
        attn_mask, position_ids = apply_documents(document_ids, True, attn_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta)
        x = self.drop(self.wte(input_ids))
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, True, T, T, input_ids.device)
        for block in self.blocks:
            x = block(x, cos, sin, mask=mask, is_causal=is_causal)
        return self.ln_f(x)

    def forward_cached(self, input_ids, input_pos):
        """Hidden states of ``input_ids`` [B, T], the tokens at positions ``input_pos..``, with every block's
        ``attn.kv_cache`` set (a :class:`~lmkit.models.layers.KVCache` of ``n_kv_head`` heads): their keys and
        values join the cache and the queries attend to all cached positions (generation). ``input_pos`` a
        tensor of T positions: a static cache (see :meth:`lmkit.models.layers.KVCache.update`)."""
        T = input_ids.shape[1]
        static = torch.is_tensor(input_pos)
        if not static and input_pos + T > self.max_seq_len:
            raise ValueError(f"position {input_pos + T - 1} is beyond the model's max_seq_len={self.max_seq_len}")
        if any(block.attn.kv_cache is None for block in self.blocks):
            raise ValueError("forward_cached needs a kv_cache on every attention layer (lmkit.models.layers.KVCache "
                             "with n_kv_head heads)")
        pos = input_pos[None] if static else torch.arange(input_pos, input_pos + T, device=input_ids.device)[None]
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta)
        x = self.wte(input_ids)
        if static:
            mask = static_causal_mask(input_pos, self.blocks[0].attn.kv_cache.k.shape[2])
        else:
            mask = None if T == 1 else causal_mask_at(input_pos, T, input_ids.device)  # one new token sees all keys
        for block in self.blocks:
            x = block(x, cos, sin, mask=mask, is_causal=False, input_pos=input_pos)
        return self.ln_f(x)

    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return hidden @ self.output_embedding().t() if self.lm_head is None else self.lm_head(hidden)

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [self.wte]
