"""BERT encoder (Devlin et al. 2019): token + position + segment embeddings, post-LN, GELU.

Bidirectional by default; ``attn_mask`` replaces that (UniLM's left-to-right and
sequence-to-sequence masks). ``pre_ln=True`` gives the pre-LN variant (with a final norm).

The LM head (:meth:`BERT.logits`) is BERT's masked-LM head: a transform
(Linear H→H, GELU, LayerNorm) then the tied word embedding plus an output bias, so
``logits(h) == transform(h) @ output_embedding().T + bias``. ``head_transform=False``
drops the transform (then ``logits(h) == h @ output_embedding().T + bias``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import (Pooler, PostLNBlock, apply_documents, build_attention_bias, require_vocab_size,
                                 sum_embeddings)


@dataclass
class BERTConfig(ArchitectureConfig):
    """Sizes and options of :class:`BERT`. ``vocab_size`` None = taken from the tokenizer.

    base: 12 layers × 768, 12 heads (110M); large: 24 × 1024, 16 heads (≈340M).
    """

    name: str = "bert"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 512
    vocab_size: int | None = None
    type_vocab_size: int = 2
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    pre_ln: bool = False
    activation: str = "gelu_exact"  # BERT's erf GELU; "gelu" = tanh approximation
    head_transform: bool = True  # BERT's MLM transform (dense + GELU + LayerNorm) in logits()
    pooler: bool = True  # [CLS] pooler for NSP/SOP/classification; False for MLM-only runs
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, BERTConfig)
        check_architecture(self)


class MLMHead(nn.Module):
    """BERT/ALBERT masked-LM transform: LayerNorm(act(Linear(h))), d_in → d_out."""

    def __init__(self, d_in: int, d_out: int, activation: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "gelu_exact": nn.GELU(), "relu": nn.ReLU()}[activation]
        self.ln = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x):
        return self.ln(self.act(self.dense(x)))


class BERT(nn.Module):
    """Bidirectional transformer encoder (BERT)."""

    kind = "encoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "document_ids", "pooled"})

    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.cfg = cfg
        V = require_vocab_size(cfg)
        D = cfg.d_model
        self.d_model, self.vocab_size, self.max_seq_len = D, V, cfg.max_seq_len
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(cfg.max_seq_len, D)
        self.wtte = nn.Embedding(cfg.type_vocab_size, D) if cfg.type_vocab_size > 0 else None
        self.ln_emb = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(D, cfg.n_head, cfg.d_ff or 4 * D, cfg.dropout, activation=cfg.activation,
                        eps=cfg.layer_norm_eps, pre_ln=cfg.pre_ln)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
        self.head = MLMHead(D, D, cfg.activation, cfg.layer_norm_eps) if cfg.head_transform else None
        self.lm_bias = nn.Parameter(torch.zeros(V))
        self.pooler = Pooler(D) if cfg.pooler else None
        # BERT: N(0, 0.02) everywhere, no GPT-2 residual scaling.
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer, residual_names=())

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        """Embedding layer output (after embedding LayerNorm and dropout): [B, T, D]."""
        x = sum_embeddings(input_ids, self.wte, self.wpe, self.wtte, token_type_ids, self.max_seq_len, position_ids)
        return self.drop(self.ln_emb(x))

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None, document_ids=None):
        T = input_ids.shape[1]
        attn_mask, position_ids = apply_documents(document_ids, False, attn_mask)
        x = self.embed(input_ids, token_type_ids, position_ids)
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, False, T, T, input_ids.device)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal)
        return x if self.ln_f is None else self.ln_f(x)

    def pooled(self, hidden):
        """[CLS] pooler output tanh(W·h₀ + b): [B, D] (for NSP/SOP and classification)."""
        if self.pooler is None:
            raise ValueError("this model was built with pooler=False")
        return self.pooler(hidden)

    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight

    def logits(self, hidden):
        h = hidden if self.head is None else self.head(hidden)
        return h @ self.wte.weight.t() + self.lm_bias

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [m for m in (self.wte, self.wpe, self.wtte) if m is not None]
