"""BART encoder–decoder (Lewis et al. 2020): learned positions, post-LN, GELU, tied embeddings.

Both stacks embed tokens with one shared embedding plus their own learned positions, apply
``layernorm_embedding``, then post-LN blocks (bidirectional in the encoder; causal
self-attention + cross-attention in the decoder). As in bart-base/large there is no extra
final norm: the last block's LayerNorm is the final norm. BART's position offset of 2
(a fairseq artefact) and its frozen ``final_logits_bias`` (zeros) are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.models.base import ArchitectureConfig
from lmkit.models.init import initialize
from lmkit.models.layers import (
    PostLNBlock,
    build_attention_bias,
    causal_mask_at,
    cross_attention_mask,
    require_vocab_size,
)


@dataclass
class BARTConfig(ArchitectureConfig):
    """Sizes and options of :class:`BART`. ``vocab_size`` None = taken from the tokenizer.

    bart-base: 6+6 layers, d_model 768, 12 heads, d_ff 3072; bart-large: 12+12, 1024, 16, 4096.
    """

    name: str = "bart"
    n_layer: int = 4  # encoder layers
    n_decoder_layer: int | None = None  # default: n_layer
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 1024
    vocab_size: int | None = None
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_exact"
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model) (mBART/fairseq option)
    init: str = "normal"
    init_std: float = 0.02
    compile: bool = False

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, BARTConfig)
        check_architecture(self)


class BARTStack(nn.Module):
    """Encoder or decoder: learned positions, embedding LayerNorm, post-LN blocks."""

    def __init__(self, cfg: BARTConfig, n_layer: int, is_decoder: bool):
        super().__init__()
        D = cfg.d_model
        self.is_decoder = is_decoder
        self.wpe = nn.Embedding(cfg.max_seq_len, D)
        self.layernorm_embedding = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(D, cfg.n_head, cfg.d_ff or 4 * D, cfg.dropout, activation=cfg.activation,
                        eps=cfg.layer_norm_eps, cross=is_decoder)
            for _ in range(n_layer)
        )

    def forward(self, tok_emb, padding_mask=None, attn_mask=None, memory=None, memory_padding_mask=None,
                input_pos=None):
        if input_pos is not None:
            return self._forward_cached(tok_emb, input_pos, memory, memory_padding_mask)
        T = tok_emb.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.wpe.num_embeddings}")
        pos = torch.arange(T, device=tok_emb.device)
        x = self.drop(self.layernorm_embedding(tok_emb + self.wpe(pos)))
        mask, is_causal = build_attention_bias(padding_mask, attn_mask, self.is_decoder, T, T, tok_emb.device)
        memory_mask = cross_attention_mask(memory_padding_mask) if self.is_decoder else None
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal, memory=memory, memory_mask=memory_mask)
        return x

    def _forward_cached(self, tok_emb, input_pos: int, memory, memory_padding_mask):
        """The decoder on the tokens at positions ``input_pos..`` (lmkit's position rows, HF's + 2),
        attending to its KV cache."""
        T = tok_emb.shape[1]
        if input_pos + T > self.wpe.num_embeddings:
            raise ValueError(f"position {input_pos + T - 1} is beyond the model's max_seq_len={self.wpe.num_embeddings}")
        pos = torch.arange(input_pos, input_pos + T, device=tok_emb.device)
        x = self.layernorm_embedding(tok_emb + self.wpe(pos))
        mask = None if T == 1 else causal_mask_at(input_pos, T, tok_emb.device)
        memory_mask = cross_attention_mask(memory_padding_mask)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=False, memory=memory, memory_mask=memory_mask, input_pos=input_pos)
        return x


class BART(nn.Module):
    """BART encoder–decoder. ``forward`` needs ``decoder_input_ids`` (the shifted targets)."""

    kind = "encoder_decoder"
    accepts = frozenset({"attn_mask", "token_type_ids", "decoder_input_ids"})  # token_type_ids: taken, ignored
    logits_are_linear = True  # logits(h) == h @ output_embedding().T: objectives may fuse head and loss

    def __init__(self, cfg: BARTConfig):
        super().__init__()
        self.cfg = cfg
        V = require_vocab_size(cfg)
        D = cfg.d_model
        self.d_model, self.vocab_size, self.max_seq_len = D, V, cfg.max_seq_len
        self.shared = nn.Embedding(V, D)
        self.embed_scale = D ** 0.5 if cfg.scale_embedding else 1.0
        self.encoder = BARTStack(cfg, cfg.n_layer, is_decoder=False)
        n_dec = cfg.n_layer if cfg.n_decoder_layer is None else cfg.n_decoder_layer
        self.decoder = BARTStack(cfg, n_dec, is_decoder=True)
        # BART: N(0, 0.02), zero biases, no GPT-2 residual scaling.
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer + n_dec, residual_names=())

    def encode(self, input_ids, padding_mask=None, attn_mask=None):
        """Encoder hidden states [B, S, D]."""
        return self.encoder(self.shared(input_ids) * self.embed_scale, padding_mask, attn_mask)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_padding_mask=None, decoder_padding_mask=None,
               input_pos=None):
        """Decoder hidden states [B, T, D] given the encoder output.

        ``input_pos`` (int, generation only): the decoder tokens at positions ``input_pos..``, with a KV
        cache on the decoder's attention layers (see :mod:`lmkit.generation`)."""
        x = self.shared(decoder_input_ids) * self.embed_scale
        if input_pos is not None:
            return self.decoder(x, None, None, encoder_hidden, encoder_padding_mask, input_pos=input_pos)
        return self.decoder(x, decoder_padding_mask, None, encoder_hidden, encoder_padding_mask)

    def forward(self, input_ids, *, padding_mask=None, attn_mask=None, token_type_ids=None,
                decoder_input_ids=None, decoder_padding_mask=None):
        """Decoder hidden states. ``attn_mask`` [B, S, S] replaces the encoder's (bidirectional)
        self-attention mask; ``token_type_ids`` are ignored (BART has no segment embeddings)."""
        if decoder_input_ids is None:
            raise ValueError("BART is an encoder–decoder: forward needs decoder_input_ids")
        memory = self.encode(input_ids, padding_mask, attn_mask)
        return self.decode(decoder_input_ids, memory, padding_mask, decoder_padding_mask)

    def output_embedding(self) -> torch.Tensor:
        return self.shared.weight

    def logits(self, hidden):
        return hidden @ self.shared.weight.t()

    def transformer_blocks(self):
        return list(self.encoder.blocks) + list(self.decoder.blocks)

    def embedding_modules(self):
        return [self.shared, self.encoder.wpe, self.decoder.wpe]
