"""T5 encoder–decoder (Raffel et al. 2020), following the reference T5 (Mesh TF / HF).

* pre-norm with RMSNorm (scale only, no bias, no mean subtraction), eps 1e-6;
* no absolute positions: a learned relative position bias over log-spaced buckets
  (bidirectional in the encoder, causal in the decoder), one table per stack, computed once
  per forward and added to every layer's self-attention logits (shared across layers as
  in T5, where layer 0 owns the table);
* no biases in any linear; attention logits are not scaled by 1/sqrt(d_head) (T5's
  initialization folds that into the query projection), so attention uses ``scale=1.0``;
* decoder: causal self-attention, cross-attention to the encoder output, FFN;
* FFN ``"relu"`` (T5) or ``"gated-gelu"`` (T5 v1.1);
* LM head tied to the shared embedding with the hidden states scaled by d_model**-0.5
  (T5), or untied (T5 v1.1).

:meth:`T5.forward` returns the decoder's final hidden states (final RMSNorm applied).
:meth:`T5.logits` applies the d_model**-0.5 rescale before the tied embedding, so for a
tied model ``logits(h) == (h * d_model**-0.5) @ output_embedding().T``; untied,
``logits(h) == h @ output_embedding().T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import (
    MLP,
    CrossAttention,
    GatedMLP,
    ScaledSelfAttention,
    build_attention_bias,
    causal_mask_at,
    cross_attention_mask,
    fold_position_bias,
    require_vocab_size,
)

T5_FFN = ("relu", "gated-gelu")
T5_INIT_SCHEMES = ("t5", "normal", "xavier")


@dataclass
class T5Config(ArchitectureConfig):
    """Sizes and options of :class:`T5`. ``vocab_size`` None = taken from the tokenizer.

    t5-small: 6+6 layers, d_model 512, 8 heads, d_ff 2048; t5-base: 12+12, 768, 12, 3072.
    ``max_seq_len`` is advisory (data chunking): relative positions impose no limit.
    """

    name: str = "t5"
    n_layer: int = 4  # encoder layers
    n_decoder_layer: int | None = None  # default: n_layer
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 512
    vocab_size: int | None = None
    dropout: float = 0.0
    ffn: str = "relu"  # "relu" (T5) or "gated-gelu" (T5 v1.1)
    num_buckets: int = 32
    max_distance: int = 128
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-6
    init: str = "t5"  # "t5": Mesh-TF scheme scaled by init_factor; "normal"/"xavier": lmkit.models.init
    init_factor: float = 1.0
    init_std: float = 0.02  # for init="normal"/"xavier"
    compile: bool = False

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, check_choice, check_int, check_positive, post_init_base

        post_init_base(self, T5Config)
        check_architecture(self, init_schemes=T5_INIT_SCHEMES)
        check_choice("model.ffn", self.ffn, T5_FFN)
        check_positive("model.init_factor", self.init_factor)
        # buckets: half for each direction (encoder), half of those exact distances, the rest log-spaced
        # up to max_distance, which must lie beyond the exact ones
        check_int("model.num_buckets", self.num_buckets, minimum=4, hint=" (relative-position buckets, e.g. 32)")
        check_int("model.max_distance", self.max_distance, minimum=self.num_buckets // 2 + 1,
                  hint=f" (it must exceed the {self.num_buckets // 2} exact distances of model.num_buckets={self.num_buckets}; e.g. 128)")


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each relative position (``key_pos - query_pos``), as in the reference.

    Half the buckets hold exact small distances, the rest log-spaced distances up to
    ``max_distance`` (anything further shares the last bucket). Bidirectional: the buckets
    are split between keys before and after the query. Causal: keys after the query all
    map to bucket 0.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket: [1, H, Q, K]."""

    def __init__(self, n_head: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def forward(self, q_len: int, k_len: int, device=None, q_offset: int = 0) -> torch.Tensor:
        """``q_offset``: the queries sit at positions ``q_offset..`` (generation with a KV cache)."""
        device = device or self.relative_attention_bias.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, dtype=torch.long, device=device)[:, None]
        k_pos = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    """Pre-RMSNorm block: self-attention (+ relative bias), [cross-attention], FFN."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        D, H, eps = cfg.d_model, cfg.n_head, cfg.layer_norm_eps
        d_ff = cfg.d_ff or 4 * D
        self.ln_1 = nn.RMSNorm(D, eps=eps)
        self.attn = ScaledSelfAttention(D, H, cfg.dropout, bias=False, scale=1.0)
        if is_decoder:
            self.ln_x = nn.RMSNorm(D, eps=eps)
            self.cross_attn = CrossAttention(D, H, cfg.dropout, bias=False, scale=1.0)
        else:
            self.cross_attn = None
        self.ln_2 = nn.RMSNorm(D, eps=eps)
        if cfg.ffn == "relu":
            self.mlp = MLP(D, d_ff, "relu", cfg.dropout, bias=False)
        elif cfg.ffn == "gated-gelu":
            self.mlp = GatedMLP(D, d_ff, "gelu", cfg.dropout, bias=False)
        else:
            raise ValueError(f"unknown T5 ffn {cfg.ffn!r}; choose one of {T5_FFN}")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, is_causal=False, position_bias=None, memory=None, memory_mask=None,
                input_pos=None):
        if input_pos is None:
            x = x + self.drop(self.attn(self.ln_1(x), mask=mask, is_causal=is_causal, position_bias=position_bias))
        else:  # generation with a KV cache
            x = x + self.drop(self.attn(self.ln_1(x), mask=mask, is_causal=is_causal, position_bias=position_bias,
                                        input_pos=input_pos))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.ln_x(x), memory, mask=memory_mask))
        return x + self.mlp(self.ln_2(x))  # MLP applies its own output dropout


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks sharing one relative position bias, final RMSNorm."""

    def __init__(self, cfg: T5Config, n_layer: int, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.relative_attention_bias = RelativePositionBias(
            cfg.n_head, bidirectional=not is_decoder, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        self.blocks = nn.ModuleList(T5Block(cfg, is_decoder) for _ in range(n_layer))
        self.ln_f = nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, attn_mask=None, memory=None, memory_padding_mask=None, input_pos=None):
        if input_pos is not None:
            return self._forward_cached(x, input_pos, memory, memory_padding_mask)
        T = x.shape[1]
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, self.is_decoder, T, T, x.device)
        # Computed once and shared by all layers; the masks are folded in here (-inf), once.
        bias = self.relative_attention_bias(T, T, x.device)
        bias, _ = fold_position_bias(bias, mask, is_causal, T, T, bias.dtype, x.device)
        memory_mask = cross_attention_mask(memory_padding_mask) if self.is_decoder else None
        for block in self.blocks:
            x = block(x, position_bias=bias, memory=memory, memory_mask=memory_mask)
        return self.drop(self.ln_f(x))

    def _forward_cached(self, x, input_pos: int, memory, memory_padding_mask):
        """The decoder on the tokens at positions ``input_pos..``, attending to its KV cache: the bias rows
        of those query positions, over keys ``0 .. input_pos+T-1``."""
        T = x.shape[1]
        K = input_pos + T
        bias = self.relative_attention_bias(T, K, x.device, q_offset=input_pos)
        bias, _ = fold_position_bias(bias, causal_mask_at(input_pos, T, x.device), False, T, K, bias.dtype, x.device)
        memory_mask = cross_attention_mask(memory_padding_mask)
        for block in self.blocks:
            x = block(x, position_bias=bias, memory=memory, memory_mask=memory_mask, input_pos=input_pos)
        return self.drop(self.ln_f(x))


class T5(nn.Module):
    """T5 encoder–decoder. ``forward`` needs ``decoder_input_ids`` (the shifted targets)."""

    kind = "encoder_decoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "decoder_input_ids"})  # token_type_ids: taken, ignored
    logits_are_linear = True  # logits(h) == head_input(h) @ output_embedding().T: objectives may fuse head and loss

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        V = require_vocab_size(cfg)
        D = cfg.d_model
        self.d_model, self.vocab_size, self.max_seq_len = D, V, cfg.max_seq_len
        self.shared = nn.Embedding(V, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = T5Stack(cfg, cfg.n_layer, is_decoder=False)
        n_dec = cfg.n_layer if cfg.n_decoder_layer is None else cfg.n_decoder_layer
        self.decoder = T5Stack(cfg, n_dec, is_decoder=True)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, V, bias=False)
        if cfg.init == "t5":
            self._init_t5(cfg.init_factor)
        elif cfg.init in T5_INIT_SCHEMES:
            initialize(self, cfg.init, cfg.init_std, cfg.n_layer + n_dec, residual_names=())
        else:
            raise ValueError(f"unknown T5 init scheme {cfg.init!r}; choose one of {T5_INIT_SCHEMES}")

    @torch.no_grad()
    def _init_t5(self, f: float) -> None:
        """Mesh-TF / HF T5 initialization (``initializer_factor`` = f).

        Differs from HF only for an untied LM head: std f·d_model**-0.5 (HF: f), which
        gives unit-scale initial logits like the tied head.
        """
        D, H = self.d_model, self.cfg.n_head
        dk = D // H
        self.shared.weight.normal_(0.0, f)
        if self.lm_head is not None:
            self.lm_head.weight.normal_(0.0, f * D ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.weight.fill_(f)
            elif isinstance(module, RelativePositionBias):
                module.relative_attention_bias.weight.normal_(0.0, f * D ** -0.5)
            elif isinstance(module, ScaledSelfAttention):
                module.qkv.weight[:D].normal_(0.0, f * (D * dk) ** -0.5)
                module.qkv.weight[D:].normal_(0.0, f * D ** -0.5)
                module.proj.weight.normal_(0.0, f * (H * dk) ** -0.5)
            elif isinstance(module, CrossAttention):
                module.q.weight.normal_(0.0, f * (D * dk) ** -0.5)
                module.kv.weight.normal_(0.0, f * D ** -0.5)
                module.proj.weight.normal_(0.0, f * (H * dk) ** -0.5)
            elif isinstance(module, (MLP, GatedMLP)):
                for lin in (getattr(module, "gate", None), module.fc):
                    if lin is not None:
                        lin.weight.normal_(0.0, f * D ** -0.5)
                module.proj.weight.normal_(0.0, f * module.proj.in_features ** -0.5)

    def encode(self, input_ids, padding_mask=None, attn_mask=None):
        """Encoder hidden states [B, S, D] (final RMSNorm applied)."""
        return self.encoder(self.drop(self.shared(input_ids)), padding_mask, attn_mask)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_padding_mask=None, decoder_padding_mask=None,
               input_pos=None):
        """Decoder hidden states [B, T, D] given the encoder output (final RMSNorm applied).

        ``input_pos`` (int, generation only): the decoder tokens at positions ``input_pos..``, with a KV
        cache on the decoder's attention layers (see :mod:`lmkit.generation`)."""
        x = self.drop(self.shared(decoder_input_ids))
        if input_pos is not None:
            return self.decoder(x, None, None, encoder_hidden, encoder_padding_mask, input_pos=input_pos)
        return self.decoder(x, decoder_padding_mask, None, encoder_hidden, encoder_padding_mask)

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None):
        """Decoder hidden states. ``attn_mask`` [B, S, S] replaces the encoder's (bidirectional)
        self-attention mask; ``token_type_ids`` are ignored (T5 has no segment embeddings)."""
        if decoder_input_ids is None:
            raise ValueError("T5 is an encoder–decoder: forward needs decoder_input_ids")
        memory = self.encode(input_ids, padding_mask, attn_mask)
        return self.decode(decoder_input_ids, memory, padding_mask, decoder_padding_mask)

    def output_embedding(self) -> torch.Tensor:
        return self.shared.weight if self.lm_head is None else self.lm_head.weight

    def head_input(self, hidden):
        """What the output embedding multiplies: tied heads rescale by d_model**-0.5 (T5)."""
        return hidden * self.d_model ** -0.5 if self.lm_head is None else hidden

    def logits(self, hidden):
        if self.lm_head is None:
            return self.head_input(hidden) @ self.shared.weight.t()
        return self.lm_head(hidden)  # a module call, so hooks on the head still run

    def transformer_blocks(self):
        return list(self.encoder.blocks) + list(self.decoder.blocks)

    def embedding_modules(self):
        return [self.shared]
