"""GPT-2 style decoder: learned positions, pre-LayerNorm, GELU MLP, tied embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.local_attention import mark_banded_layers
from lmkit.models.layers import (
    MLP,
    SelfAttention,
    apply_documents,
    build_attention_bias,
    causal_mask_at,
    static_causal_mask,
    sum_embeddings,
)


@dataclass
class GPTConfig(ArchitectureConfig):
    """Sizes and options of :class:`GPT`. ``vocab_size`` None = taken from the tokenizer."""

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 256
    vocab_size: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False
    attention: str = "dense"  # or "alternating_local": odd layers banded (lmkit.models.local_attention)
    attention_window: int | None = None  # alternating_local: a banded position sees the previous W, itself included

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, GPTConfig)
        check_architecture(self)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.dropout, cfg.bias)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, "gelu", cfg.dropout, cfg.bias)

    def forward(self, x, mask=None, is_causal=True, input_pos=None):
        if input_pos is None:
            x = x + self.attn(self.ln_1(x), mask=mask, is_causal=is_causal)
        else:  # generation with a KV cache
            x = x + self.attn(self.ln_1(x), mask=mask, is_causal=is_causal, input_pos=input_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer (GPT-2). Causal by default; ``attn_mask`` allows prefix LM.

    ``document_ids`` [B, T] (optional) keeps attention inside each packed document and
    restarts the learned positions at every document.
    """

    kind = "decoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "document_ids"})  # token_type_ids: taken, ignored
    logits_are_linear = True  # logits(h) == h @ output_embedding().T: objectives may fuse head and loss
    static_kv_cache = True  # forward_cached/_forward_cached take tensor positions (lmkit.generation cache=static)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        mark_banded_layers(self.blocks, cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer)

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None, document_ids=None, input_pos=None):
        """``input_pos`` (int, generation only): ``input_ids`` are the tokens at positions ``input_pos..``
        and every attention layer has a ``kv_cache`` (see :mod:`lmkit.generation`)."""
        if input_pos is not None:
            return self._forward_cached(input_ids, input_pos)
        T = input_ids.shape[1]
        attn_mask, position_ids = apply_documents(document_ids, True, attn_mask)
        x = self.drop(sum_embeddings(input_ids, self.wte, self.wpe, max_seq_len=self.max_seq_len,
                                     position_ids=position_ids))
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, True, T, T, input_ids.device)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal)
        return self.ln_f(x)

    def _forward_cached(self, input_ids, input_pos):
        T = input_ids.shape[1]
        static = torch.is_tensor(input_pos)  # a static cache: positions given as a tensor, every key masked
        if not static and input_pos + T > self.max_seq_len:
            raise ValueError(f"position {input_pos + T - 1} is beyond the model's max_seq_len={self.max_seq_len}")
        pos = input_pos if static else torch.arange(input_pos, input_pos + T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        if static:
            mask = static_causal_mask(input_pos, self.blocks[0].attn.kv_cache.k.shape[2])
        else:
            mask = None if T == 1 else causal_mask_at(input_pos, T, input_ids.device)  # one new token sees all keys
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=False, input_pos=input_pos)
        return self.ln_f(x)

    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return hidden @ self.output_embedding().t() if self.lm_head is None else self.lm_head(hidden)

    def transformer_blocks(self):
        return list(self.blocks)

    def embedding_modules(self):
        return [self.wte, self.wpe]
