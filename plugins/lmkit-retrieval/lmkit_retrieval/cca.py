"""Chunked cross-attention (CCA), RETRO's retrieval layer (Borgeaud et al. 2021, §2.4, Fig. 2).

The sequence H [B, n, d] is cut into l = ceil(n / m) chunks of m tokens; chunk u (0-based) has
its encoded neighbours E_u [k·r, d_mem]. Causality: the neighbours of chunk u were retrieved with
all of chunk u's tokens, so only the tokens from the *last* token of chunk u on may see them.
CCA shifts H left by m − 1, so that the "attending chunk" u⁺ = H[u·m + m − 1 : (u+1)·m + m − 1]
starts at that last token, lets every attending chunk cross-attend to its own chunk's neighbours
(all k·r tokens at once), and shifts the result back: the first m − 1 positions get nothing.

Everything is batched over chunks ([B·l, m, d] queries, [B·l, k·r, d_mem] keys), no loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.models.layers import cross_attention_mask


def num_chunks(seq_len: int, chunk_len: int) -> int:
    """Chunks of a ``seq_len``-token input: the last one may be partial."""
    return math.ceil(seq_len / chunk_len)


def chunk_of_positions(seq_len: int, chunk_len: int, device=None) -> torch.Tensor:
    """Long [seq_len]: the chunk whose neighbours each position attends to through CCA, -1 for none.

    Position p belongs to attending chunk (p − m + 1) // m; the first m − 1 positions to none.
    """
    pos = torch.arange(seq_len, device=device)
    return torch.where(pos >= chunk_len - 1, (pos - chunk_len + 1) // chunk_len, -1)


def attending_chunks(h: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """[B, n, d] -> [B, l, m, d]: attending chunk u holds positions u·m + m − 1 … u·m + 2m − 2 (0 past n)."""
    B, n, d = h.shape
    l = num_chunks(n, chunk_len)
    shifted = h[:, chunk_len - 1:]
    shifted = F.pad(shifted, (0, 0, 0, l * chunk_len - shifted.shape[1]))
    return shifted.reshape(B, l, chunk_len, d)


def merge_attending_chunks(y: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of :func:`attending_chunks`: [B, l, m, d] -> [B, n, d], zeros at the first m − 1 positions."""
    B, l, m, d = y.shape
    return F.pad(y.reshape(B, l * m, d), (0, 0, m - 1, 0))[:, :seq_len]


def query_chunks(h: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """[B, n, d] -> [B, l, m, d]: the chunks C_u themselves (zeros past n), what retrieval was queried with."""
    B, n, d = h.shape
    l = num_chunks(n, chunk_len)
    return F.pad(h, (0, 0, 0, l * chunk_len - n)).reshape(B, l, chunk_len, d)


class ChunkedCrossAttention(nn.Module):
    """Multi-head chunked cross-attention from a sequence [B, n, d_model] to per-chunk memories.

    ``forward(x, memory, memory_mask=None)``: ``memory`` [B, l, S, d_memory] holds the encoded
    neighbours of each chunk (S = k·r), ``memory_mask`` bool [B, l, S] (True = a real neighbour
    token). Returns [B, n, d_model], to be added residually. The output is exactly zero at the
    first m − 1 positions and for every attending chunk whose neighbours are all masked.
    """

    def __init__(self, d_model: int, d_memory: int, n_head: int, chunk_len: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.chunk_len, self.dropout = n_head, chunk_len, dropout
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_memory, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, n, D = x.shape
        m, h = self.chunk_len, self.n_head
        l, S = memory.shape[1], memory.shape[2]
        if l != num_chunks(n, m):
            raise ValueError(f"memory has {l} chunks; a {n}-token input has {num_chunks(n, m)} chunks of {m}")
        q = self.q(attending_chunks(x, m)).view(B * l, m, h, D // h).transpose(1, 2)
        k, v = self.kv(memory.reshape(B * l, S, -1)).split(D, dim=-1)
        k, v = (t.view(B * l, S, h, D // h).transpose(1, 2) for t in (k, v))
        mask = None if memory_mask is None else memory_mask.reshape(B * l, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cross_attention_mask(mask),
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.proj(y.transpose(1, 2).reshape(B, l, m, D))
        if mask is not None:  # a chunk without any neighbour contributes nothing (not the proj bias)
            y = torch.where(mask.view(B, l, S).any(-1)[:, :, None, None], y, torch.zeros_like(y))
        return merge_attending_chunks(y, n)
