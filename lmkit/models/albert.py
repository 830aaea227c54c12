"""ALBERT encoder (Lan et al. 2020): factorized embedding and cross-layer parameter sharing.

* Factorized embedding: tokens (and positions, segments) are embedded in E dimensions
  (``embedding_size``, 128 by default), LayerNorm'd, then projected E→H by
  ``embedding_hidden_mapping_in``.
* Cross-layer sharing (``share``): ``"all"`` (ALBERT's default: one layer's weights, norms
  included, used by every layer), ``"attention"`` (only the attention projections are
  shared), ``"ffn"`` (only the feed-forward network is shared), ``"none"``.
  :meth:`ALBERT.transformer_blocks` returns the ``n_layer`` *logical* blocks, which hold
  the very same sub-modules where they share. Assigning a new ``.mlp`` to one block
  replaces it for that layer only; to keep the sharing, assign one module to every block.
* Post-LN blocks with GELU (tanh approximation, ALBERT's ``gelu_new``), [CLS] pooler for
  sentence-order prediction, N(0, 0.02) init.

Output embedding (a deviation from the [V, d_model] contract, by construction): the MLM
head maps H→E (Linear, GELU, LayerNorm in E) and then uses the tied V×E input embedding,
so :meth:`ALBERT.output_embedding` returns the [V, E] matrix, the model exposes
``embedding_size = E``, and ``logits(h) == head(h) @ output_embedding().T + bias``. Code
that needs vocabulary logits should call :meth:`ALBERT.logits`; code that uses
``output_embedding()`` directly must apply :meth:`ALBERT.project_to_embedding` first
(or check ``embedding_size != d_model``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.bert import MLMHead
from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import (Pooler, PostLNBlock, apply_documents, build_attention_bias, require_vocab_size,
                                 sum_embeddings)

ALBERT_SHARE_MODES = ("all", "attention", "ffn", "none")


@dataclass
class ALBERTConfig(ArchitectureConfig):
    """Sizes and options of :class:`ALBERT`. ``vocab_size`` None = taken from the tokenizer.

    albert-base: 12 × 768, 12 heads, d_ff 3072, E 128, share "all" (12M parameters).
    """

    name: str = "albert"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    embedding_size: int = 128  # E
    max_seq_len: int = 512
    vocab_size: int | None = None
    type_vocab_size: int = 2
    share: str = "all"  # "all" | "attention" | "ffn" | "none"
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # tanh-approximated GELU (ALBERT's gelu_new)
    pooler: bool = True  # [CLS] pooler for SOP/classification; False for MLM-only runs
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, check_choice, check_int, post_init_base

        post_init_base(self, ALBERTConfig)
        check_architecture(self)
        check_int("model.embedding_size", self.embedding_size, minimum=1, hint=" (E, the factorized embedding size)")
        check_choice("model.share", self.share, ALBERT_SHARE_MODES)


class ALBERT(nn.Module):
    """Bidirectional encoder with factorized embeddings and cross-layer parameter sharing."""

    kind = "encoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "document_ids", "pooled"})

    def __init__(self, cfg: ALBERTConfig):
        super().__init__()
        if cfg.share not in ALBERT_SHARE_MODES:
            raise ValueError(f"unknown ALBERT share mode {cfg.share!r}; choose one of {ALBERT_SHARE_MODES}")
        self.cfg = cfg
        V = require_vocab_size(cfg)
        D, E = cfg.d_model, cfg.embedding_size
        self.d_model, self.vocab_size, self.max_seq_len = D, V, cfg.max_seq_len
        self.embedding_size = E
        self.wte = nn.Embedding(V, E)
        self.wpe = nn.Embedding(cfg.max_seq_len, E)
        self.wtte = nn.Embedding(cfg.type_vocab_size, E) if cfg.type_vocab_size > 0 else None
        self.ln_emb = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.embedding_hidden_mapping_in = nn.Linear(E, D)

        def make_block(**shared):
            return PostLNBlock(D, cfg.n_head, cfg.d_ff or 4 * D, cfg.dropout, activation=cfg.activation,
                               eps=cfg.layer_norm_eps, **shared)

        blocks = []
        for i in range(cfg.n_layer):
            if i == 0 or cfg.share == "none":
                blocks.append(make_block())
                continue
            first = blocks[0]
            if cfg.share == "all":
                blocks.append(make_block(attn=first.attn, mlp=first.mlp, ln_1=first.ln_1, ln_2=first.ln_2))
            elif cfg.share == "attention":
                blocks.append(make_block(attn=first.attn))
            else:  # "ffn"
                blocks.append(make_block(mlp=first.mlp))
        self.blocks = nn.ModuleList(blocks)
        self.head = MLMHead(D, E, cfg.activation, cfg.layer_norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(V))
        self.pooler = Pooler(D) if cfg.pooler else None
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer, residual_names=())

    def embed(self, input_ids, token_type_ids=None, position_ids=None):
        """Embeddings projected to the hidden size: [B, T, D]."""
        x = sum_embeddings(input_ids, self.wte, self.wpe, self.wtte, token_type_ids, self.max_seq_len, position_ids)
        return self.embedding_hidden_mapping_in(self.drop(self.ln_emb(x)))

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None, document_ids=None):
        T = input_ids.shape[1]
        attn_mask, position_ids = apply_documents(document_ids, False, attn_mask)
        x = self.embed(input_ids, token_type_ids, position_ids)
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, False, T, T, input_ids.device)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal)
        return x

    def pooled(self, hidden):
        """[CLS] pooler output tanh(W·h₀ + b): [B, D] (for sentence-order prediction)."""
        if self.pooler is None:
            raise ValueError("this model was built with pooler=False")
        return self.pooler(hidden)

    def project_to_embedding(self, hidden):
        """The MLM head's H→E transform (Linear, GELU, LayerNorm): [..., E]."""
        return self.head(hidden)

    def output_embedding(self) -> torch.Tensor:
        """The tied [V, E] word embedding (E = ``embedding_size``, not d_model; see module doc)."""
        return self.wte.weight

    def logits(self, hidden):
        return self.head(hidden) @ self.wte.weight.t() + self.lm_bias

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [m for m in (self.wte, self.wpe, self.wtte) if m is not None]
