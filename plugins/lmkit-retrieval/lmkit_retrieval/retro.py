"""RETRO-style decoder (Borgeaud et al. 2021): a GPT decoder whose CCA layers read retrieved neighbours.

The input of n tokens is cut into l = ceil(n / m) chunks of m = ``chunk_len`` tokens (the last
one may be partial). For each chunk C_u the data path retrieves k = ``n_neighbours`` neighbours
of r tokens (a retrieved chunk and its continuation, r = 2m in the paper), passed to ``forward``
as ``neighbours`` [B, l, k, r]. At the first CCA layer a small bidirectional encoder encodes every
neighbour, cross-attending to the decoder's hidden states of its query chunk C_u; every CCA layer
(:class:`lmkit_retrieval.cca.ChunkedCrossAttention`) then lets the tokens from the last token of
C_u up to the one before the last token of C_{u+1} attend to E(Ret(C_u)). No token sees
neighbours retrieved with a chunk it has not fully seen.

Without ``neighbours`` (or with all of a chunk's neighbours masked) the CCA layers add exactly
zero, and the model is the plain pre-LN GPT decoder (same parameter names as
:class:`lmkit.models.gpt.GPT`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.config.checks import check_int
from lmkit.errors import ConfigError
from lmkit.models.base import ArchitectureConfig
from lmkit.models.gpt import Block
from lmkit.models.init import initialize
from lmkit.models.layers import PostLNBlock, build_attention_bias, cross_attention_mask, sum_embeddings
from lmkit_retrieval.cca import ChunkedCrossAttention, num_chunks, query_chunks


@dataclass
class RETROConfig(ArchitectureConfig):
    """Sizes and options of :class:`RETRO`. The decoder fields are :class:`~lmkit.models.gpt.GPTConfig`'s.

    ``chunk_len`` (m): tokens per chunk. ``n_neighbours`` (k) and ``neighbour_len`` (r; null =
    2·chunk_len, a chunk and its continuation): the shape of the neighbours of each chunk.
    ``cca_layers``: 0-based decoder layers with chunked cross-attention; null = the paper's
    layout, every 3rd layer from index 5 (from the last layer when there are fewer than 6).
    ``enc_layers``, ``enc_d_model`` (null = d_model), ``enc_n_head`` (null = n_head): the
    neighbour encoder.
    """

    name: str = "retro"
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
    chunk_len: int = 64
    n_neighbours: int = 2
    neighbour_len: int | None = None
    cca_layers: list[int] | None = None
    enc_layers: int = 2
    enc_d_model: int | None = None
    enc_n_head: int | None = None

    def __post_init__(self):
        from lmkit.models.checks import check_architecture, post_init_base

        post_init_base(self, RETROConfig)
        check_architecture(self)
        check_int("model.chunk_len", self.chunk_len, minimum=1, maximum=self.max_seq_len,
                  hint=" (m: tokens per retrieval chunk, at most model.max_seq_len)")
        check_int("model.n_neighbours", self.n_neighbours, minimum=1, hint=" (k: neighbours retrieved per chunk)")
        check_int("model.neighbour_len", self.neighbour_len, minimum=1, optional=True,
                  hint=" (r: tokens per neighbour; null = 2 * model.chunk_len)")
        check_int("model.enc_layers", self.enc_layers, minimum=1, hint=" (layers of the neighbour encoder)")
        check_int("model.enc_d_model", self.enc_d_model, minimum=1, optional=True, hint=" (null = model.d_model)")
        check_int("model.enc_n_head", self.enc_n_head, minimum=1, optional=True, hint=" (null = model.n_head)")
        if self.encoder_width % self.encoder_heads:
            raise ConfigError(
                f"model.enc_d_model={self.encoder_width} is not divisible by model.enc_n_head={self.encoder_heads}: "
                f"set model.enc_n_head to a divisor of {self.encoder_width} (or model.enc_d_model to a multiple)")
        if self.cca_layers is not None:
            if not isinstance(self.cca_layers, (list, tuple)) or not self.cca_layers:
                raise ConfigError(f"model.cca_layers must be a non-empty list of decoder layer indices or null "
                                  f"(every 3rd layer from index 5), got {self.cca_layers!r}")
            for pos, i in enumerate(self.cca_layers):
                check_int(f"model.cca_layers[{pos}]", i, minimum=0, maximum=self.n_layer - 1,
                          hint=f" (0-based indices of the model.n_layer={self.n_layer} decoder layers)")
            if len(set(self.cca_layers)) != len(self.cca_layers):
                raise ConfigError(f"model.cca_layers={list(self.cca_layers)} names a layer twice; list each once")

    @property
    def encoder_width(self) -> int:
        return self.enc_d_model or self.d_model

    @property
    def encoder_heads(self) -> int:
        return self.enc_n_head or self.n_head

    @property
    def neighbour_tokens(self) -> int:
        """r: tokens per neighbour."""
        return self.neighbour_len or 2 * self.chunk_len

    def cca_layer_indices(self) -> list[int]:
        """The decoder layers with chunked cross-attention, sorted (``cca_layers`` or the paper's layout)."""
        if self.cca_layers is not None:
            return sorted(self.cca_layers)
        return list(range(min(5, self.n_layer - 1), self.n_layer, 3))


class NeighbourEncoder(nn.Module):
    """Bidirectional pre-LN transformer over each neighbour, conditioned on its query chunk.

    Every layer: self-attention over the neighbour's r tokens, cross-attention to the decoder's
    hidden states of the chunk C_u the neighbour was retrieved for, MLP. Shared by all neighbours.
    """

    def __init__(self, cfg: RETROConfig):
        super().__init__()
        d_in, d = cfg.d_model, cfg.encoder_width
        self.inp = nn.Linear(d_in, d, bias=cfg.bias)  # the decoder's token embeddings -> encoder width
        self.wpe = nn.Embedding(cfg.neighbour_tokens, d)
        self.cond = nn.Linear(d_in, d, bias=cfg.bias)  # query chunk states -> encoder width
        self.blocks = nn.ModuleList(
            PostLNBlock(d, cfg.encoder_heads, 4 * d, cfg.dropout, activation="gelu", bias=cfg.bias, pre_ln=True,
                        cross=True)
            for _ in range(cfg.enc_layers))
        self.ln_f = nn.LayerNorm(d, bias=cfg.bias)

    def forward(self, neighbour_emb, neighbour_mask, chunk_states, chunk_mask):
        """``neighbour_emb`` [B, l, k, r, d_model], ``neighbour_mask`` bool [B, l, k, r], ``chunk_states``
        [B, l, m, d_model], ``chunk_mask`` bool [B, l, m] -> encoded neighbours [B, l, k·r, enc_d_model]."""
        B, l, k, r, _ = neighbour_emb.shape
        m = chunk_states.shape[2]
        x = self.inp(neighbour_emb).reshape(B * l * k, r, -1) + self.wpe(torch.arange(r, device=neighbour_emb.device))
        d = x.shape[-1]
        memory = self.cond(chunk_states)[:, :, None].expand(B, l, k, m, d).reshape(B * l * k, m, d)
        memory_mask = cross_attention_mask(chunk_mask[:, :, None].expand(B, l, k, m).reshape(B * l * k, m))
        self_mask, _ = build_attention_bias(neighbour_mask.reshape(B * l * k, r), None, False, r, r, x.device)
        for block in self.blocks:
            x = block(x, mask=self_mask, memory=memory, memory_mask=memory_mask)
        return self.ln_f(x).reshape(B, l, k * r, d)


class RETROBlock(Block):
    """GPT's pre-LN block, with a chunked cross-attention sub-layer between attention and MLP when ``cca``.

    ``x + attn(ln_1(x))``, then ``x + cca(ln_cca(x), E)`` (when neighbours are given), then ``x + mlp(ln_2(x))``.
    """

    def __init__(self, cfg: RETROConfig, cca: bool):
        super().__init__(cfg)
        if cca:
            self.ln_cca = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
            self.cca = ChunkedCrossAttention(cfg.d_model, cfg.encoder_width, cfg.n_head, cfg.chunk_len,
                                             cfg.dropout, cfg.bias)
        else:
            self.ln_cca = self.cca = None

    def forward(self, x, mask=None, is_causal=True, retrieval=None):
        x = x + self.attn(self.ln_1(x), mask=mask, is_causal=is_causal)
        if self.cca is not None and retrieval is not None:
            h = self.ln_cca(x)
            x = x + self.cca(h, retrieval.encoded(h), retrieval.memory_mask)
        return x + self.mlp(self.ln_2(x))


class _Retrieval:
    """The neighbours of one forward pass; encoded once, at the first CCA layer, from that layer's states."""

    def __init__(self, encoder, neighbour_emb, neighbour_mask, chunk_len, token_mask):
        self.encoder, self.neighbour_emb, self.neighbour_mask = encoder, neighbour_emb, neighbour_mask
        self.chunk_len, self.token_mask = chunk_len, token_mask
        B, l, k, r = neighbour_mask.shape
        self.memory_mask = neighbour_mask.reshape(B, l, k * r)
        self._encoded = None

    def encoded(self, h):
        if self._encoded is None:
            chunk_mask = query_chunks(self.token_mask[..., None], self.chunk_len)[..., 0]
            self._encoded = self.encoder(self.neighbour_emb, self.neighbour_mask,
                                         query_chunks(h, self.chunk_len), chunk_mask)
        return self._encoded


class RETRO(nn.Module):
    """Retrieval-enhanced decoder: GPT-2 style decoder + chunked cross-attention to encoded neighbours.

    ``forward(input_ids, *, padding_mask=None, neighbours=None, neighbour_mask=None)``:
    ``neighbours`` int [B, l, k, r] with l = ceil(T / chunk_len) (one entry per chunk, the last
    one may be partial), k = ``n_neighbours``, r <= ``neighbour_len``; ``neighbour_mask`` bool
    [B, l, k, r], False for padding and for missing neighbours (None = all real). Row u holds
    the neighbours retrieved with chunk u = tokens ``u·m … u·m + m − 1``; the model itself
    makes them visible only from position ``u·m + m − 1`` on.
    """

    kind = "decoder"
    accepts = frozenset({"neighbours", "token_type_ids"})  # token_type_ids: taken, ignored
    logits_are_linear = True

    def __init__(self, cfg: RETROConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.vocab_size, self.max_seq_len = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
        self.chunk_len, self.n_neighbours = cfg.chunk_len, cfg.n_neighbours
        cca_layers = set(cfg.cca_layer_indices())
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(RETROBlock(cfg, i in cca_layers) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.encoder = NeighbourEncoder(cfg)
        initialize(self, cfg.init, cfg.init_std, cfg.n_layer)

    def forward(self, input_ids, *, padding_mask=None, neighbours=None, neighbour_mask=None, token_type_ids=None):
        B, T = input_ids.shape
        x = self.drop(sum_embeddings(input_ids, self.wte, self.wpe, max_seq_len=self.max_seq_len))
        mask, is_causal = build_attention_bias(padding_mask, None, True, T, T, input_ids.device)
        retrieval = None
        if neighbours is not None:
            neighbour_mask = self._check_neighbours(neighbours, neighbour_mask, B, T)
            token_mask = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if padding_mask is None
                          else padding_mask.bool())
            retrieval = _Retrieval(self.encoder, self.drop(self.wte(neighbours)), neighbour_mask, self.chunk_len,
                                   token_mask)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal, retrieval=retrieval)
        return self.ln_f(x)

    def _check_neighbours(self, neighbours, neighbour_mask, B, T):
        l = num_chunks(T, self.chunk_len)
        want = f"[{B}, {l}, {self.n_neighbours}, r<={self.cfg.neighbour_tokens}]"
        shape = tuple(neighbours.shape)
        if (len(shape) != 4 or shape[:3] != (B, l, self.n_neighbours) or not 1 <= shape[3] <= self.cfg.neighbour_tokens
                or neighbours.dtype.is_floating_point):
            raise ValueError(
                f"neighbours must be token ids [batch, chunks, n_neighbours, r] = {want} for a {T}-token input "
                f"(chunks = ceil({T} / chunk_len={self.chunk_len}), the last may be partial), got "
                f"{neighbours.dtype} {list(shape)}")
        if neighbour_mask is None:
            return torch.ones(shape, dtype=torch.bool, device=neighbours.device)
        if tuple(neighbour_mask.shape) != shape:
            raise ValueError(f"neighbour_mask must have the shape of neighbours {list(shape)}, "
                             f"got {list(neighbour_mask.shape)}")
        return neighbour_mask.bool()

    def output_embedding(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return hidden @ self.output_embedding().t() if self.lm_head is None else self.lm_head(hidden)

    def transformer_blocks(self):
        return list(self.encoder.blocks) + list(self.blocks)

    def embedding_modules(self):
        return [self.wte, self.wpe, self.encoder.wpe]
