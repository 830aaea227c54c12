"""Relative-position multi-head attention of Transformer-XL and XLNet, with optional memory keys.

Score of query i and key j (Dai et al. 2019, eq. 3, with learned global biases u and v)::

    (W_q x_i + u)ᵀ W_{k,E} x_j  +  (W_q x_i + v)ᵀ W_{k,R} R_{i-j}  [+ (W_q x_i + b)ᵀ s_{ij}]

``R`` is the sinusoidal embedding of the distance i − j (no absolute positions anywhere); the
optional last term is XLNet's relative segment encoding (``s_ij`` one of two learned vectors:
same segment or not). Keys are the concatenation [memory ∘ current segment]; the caller gives
the positions of queries and keys, so one module serves causal recurrence (Transformer-XL)
and bidirectional/permuted attention (XLNet's content and query streams).

The position term is computed once per distinct distance ([B, H, Tq, R], R ≈ Tq + K) and
gathered to [B, H, Tq, K] (the same result as the paper's "relative shift"), then enters
``scaled_dot_product_attention`` as an additive mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_embedding(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    """[R, d_model] = [sin(d·f) ∘ cos(d·f)] with f_k = 10000^(−2k/d_model), as Transformer-XL."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, device=distances.device, dtype=torch.float32) / d_model))
    angles = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_layout(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances [R], index [Tq, K])``: every distance q_pos[i] − k_pos[j] once, and where each pair's is.

    ``distances`` runs from the largest to the smallest (Transformer-XL's order); ``index[i, j]``
    points at q_pos[i] − k_pos[j] in it.
    """
    dist = q_pos[:, None] - k_pos[None, :]
    high, low = int(dist.max()), int(dist.min())
    distances = torch.arange(high, low - 1, -1, device=q_pos.device)
    return distances, high - dist


class RelativeAttention(nn.Module):
    """Multi-head attention with relative positions (and, with ``segments``, XLNet's relative segments).

    Call :meth:`keys_values` once per layer on [memory ∘ segment] and :meth:`position_keys` on the
    distance embeddings; :meth:`attend` then serves any number of query streams against them.
    Returns the attention output projected back to ``d_model`` (no residual, no norm).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int | None = None, dropout: float = 0.0,
                 segments: bool = False):
        super().__init__()
        d_head = d_head or d_model // n_head
        self.n_head, self.d_head = n_head, d_head
        inner = n_head * d_head
        self.q = nn.Linear(d_model, inner, bias=False)
        self.kv = nn.Linear(d_model, 2 * inner, bias=False)
        self.r = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(n_head, d_head))  # content bias ("r_w_bias")
        self.v = nn.Parameter(torch.zeros(n_head, d_head))  # position bias ("r_r_bias")
        if segments:
            self.s = nn.Parameter(torch.zeros(n_head, d_head))  # segment bias ("r_s_bias")
            self.seg_embed = nn.Parameter(torch.zeros(2, n_head, d_head))
        else:
            self.s = self.seg_embed = None
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.d_head).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, K, d_head] of ``context`` [B, K, d_model] (memory ∘ segment)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def position_keys(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """W_{k,R} R: [H, R, d_head] from distance embeddings [R, d_model]."""
        return self.r(pos_emb).view(-1, self.n_head, self.d_head).transpose(0, 1)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, index: torch.Tensor,
               mask: torch.Tensor | None = None, segment_differs: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of queries from ``x`` [B, Tq, D] over ``k``/``v`` [B, H, K, d_head].

        ``r`` [H, R, d_head] from :meth:`position_keys`, ``index`` [Tq, K] from
        :func:`relative_layout`; ``mask`` bool broadcastable to [B, H, Tq, K], True = may attend;
        ``segment_differs`` bool [B, Tq, K] (XLNet, needs ``segments``). A query that may attend to
        nothing gets a zero output (and passes no gradient), never a uniform mix.
        """
        B, Tq, _ = x.shape
        q = self._heads(self.q(x))  # [B, H, Tq, dh]
        position = torch.einsum("bhqd,hrd->bhqr", q + self.v[None, :, None], r)
        bias = torch.gather(position, -1, index.expand(B, self.n_head, Tq, index.shape[-1]))
        if segment_differs is not None:
            seg = torch.einsum("bhqd,shd->bhqs", q + self.s[None, :, None], self.seg_embed)  # [B, H, Tq, 2]
            bias = bias + torch.where(segment_differs[:, None], seg[..., 1:2], seg[..., 0:1])
        bias = bias * (1.0 / math.sqrt(self.d_head))
        visible = None
        if mask is not None:
            visible = mask.any(-1, keepdim=True)  # rows that see something
            bias = bias.masked_fill(~(mask | ~visible), float("-inf"))
        out = F.scaled_dot_product_attention(q + self.u[None, :, None], k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        if visible is not None:
            out = out * visible.to(out.dtype)
        return self.o(out.transpose(1, 2).reshape(B, Tq, self.n_head * self.d_head))
