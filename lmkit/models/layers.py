"""Building blocks shared by the built-in transformers: attention, MLP, masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.models.local_attention import banded_self_attention


def build_attention_bias(
    padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    causal: bool,
    q_len: int,
    k_len: int,
    device,
) -> tuple[torch.Tensor | None, bool]:
    """Combine masks into what ``scaled_dot_product_attention`` takes.

    Returns ``(mask, is_causal)``. When only causality is needed, the mask is None and
    ``is_causal`` is True, so SDPA can pick its fused causal kernels.
    ``padding_mask`` [B, K] is True for real tokens; ``attn_mask`` [B, Q, K] True = may attend.
    """
    if attn_mask is None and padding_mask is None:
        return None, causal
    mask = None
    if attn_mask is not None:
        mask = attn_mask[:, None, :, :]
    elif causal:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    if padding_mask is not None:
        pad = padding_mask[:, None, None, :].bool()
        mask = pad if mask is None else mask & pad
    # A query row that may attend to nothing (a padded query) would give NaN; let it see itself.
    if q_len == k_len:
        eye = torch.eye(q_len, dtype=torch.bool, device=device)[None, None]
        mask = mask | eye
    return mask, False


def document_attention_mask(document_ids: torch.Tensor, causal: bool,
                            attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, T, T] mask (True = may attend) that keeps attention inside each document.

    ``document_ids`` [B, T] numbers the documents packed into each row (non-decreasing).
    The result is combined with ``attn_mask`` when one is given (it then replaces
    causality, as in :func:`build_attention_bias`); otherwise it is made causal when
    ``causal`` is set.
    """
    mask = document_ids[:, :, None] == document_ids[:, None, :]
    if attn_mask is not None:
        return mask & attn_mask.bool()
    return mask.tril() if causal else mask


def apply_documents(document_ids: torch.Tensor | None, causal: bool,
                    attn_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(attn_mask, position_ids)`` for an architecture's forward given optional ``document_ids``.

    Without document ids both pass through (``attn_mask`` unchanged, default positions);
    with them, attention is kept inside each document and positions restart at each one.
    """
    if document_ids is None:
        return attn_mask, None
    return document_attention_mask(document_ids, causal, attn_mask), document_positions(document_ids)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] that restart at 0 at the first token of every document."""
    T = document_ids.shape[1]
    idx = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def document_ids_from_separators(tokens: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Number the documents of packed rows [B, T]: a separator (EOS) ends its document.

    The separator itself belongs to the document it ends, so the first token after it
    starts the next one.
    """
    is_sep = tokens == separator_id
    return (is_sep.cumsum(dim=1) - is_sep.long()).to(torch.int32)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.scale = None  # SDPA's 1/sqrt(d_head)
        self.kv_cache: KVCache | None = None  # generation only (lmkit.generation); training never sets it
        self.window: int | None = None  # set by the model: a banded layer (lmkit.models.local_attention)

    def forward(self, x, mask=None, is_causal=False, position_bias=None, input_pos=None):
        """``input_pos`` (generation only): with ``kv_cache`` set, ``x`` holds the tokens at positions
        ``input_pos .. input_pos+T-1``; their keys/values are written to the cache and the queries attend to
        all cached keys ``0 .. input_pos+T-1`` (``mask``/``position_bias`` are then [.., T, input_pos+T])."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        mask, is_causal = fold_position_bias(position_bias, mask, is_causal, T, k.shape[2], q.dtype, x.device)
        if self.window is not None:  # a banded layer of model.attention=alternating_local
            y = banded_self_attention(q, k, v, self.window, mask, self.dropout if self.training else 0.0, self.scale)
            return self.proj(y.transpose(1, 2).reshape(B, T, D))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class KVCache:
    """Keys and values of one self-attention layer during generation: [B, H, max_len, d_head] each.

    Not a module (no state_dict entry, nothing for training to see): :mod:`lmkit.generation` attaches
    one to each attention layer (``attn.kv_cache``) for a generation and removes it afterwards.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=None):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` [B, H, T, hd] at positions ``input_pos..``; all keys/values up to there.

        ``input_pos`` a tensor of T positions (the static cache of ``lmkit.generation``'s ``cache=static``):
        written there, and the whole cache is returned, whatever the position, so that every decode step has
        the same shapes (what ``torch.compile`` and CUDA graphs need); :func:`static_causal_mask` hides the
        positions not written yet.
        """
        if torch.is_tensor(input_pos):
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        end = input_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; position {end - 1} was asked for")
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class MemoryKV:
    """Cross-attention keys/values of the encoder memory, computed once per generation (``None`` until then)."""

    def __init__(self):
        self.k = self.v = None


def static_causal_mask(positions: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool [1, 1, T, max_len]: the query at ``positions[i]`` may attend to cache entries at positions <= it
    (a static KV cache of ``max_len`` positions, whose later entries are stale or empty)."""
    return (torch.arange(max_len, device=positions.device)[None, :] <= positions[:, None])[None, None]


def causal_mask_at(input_pos: int, q_len: int, device) -> torch.Tensor:
    """Bool [1, 1, q_len, input_pos+q_len]: query i (at position ``input_pos+i``) may attend to keys <= it.

    Explicit, since SDPA's ``is_causal`` aligns top-left when q_len != k_len (pytorch#108108).
    """
    k_pos = torch.arange(input_pos + q_len, device=device)
    q_pos = torch.arange(input_pos, input_pos + q_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None])[None, None]


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> activation -> Linear."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "gelu_exact": nn.GELU(), "relu": nn.ReLU()}[activation]
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


# --- Encoder / encoder–decoder building blocks (BERT, T5, BART, ALBERT) -----------------


def fold_position_bias(
    position_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    is_causal: bool,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    device,
) -> tuple[torch.Tensor | None, bool]:
    """Fold an additive position bias [1 or B, H, Q, K] into an SDPA mask.

    ``mask`` (bool, True = may attend) and ``is_causal`` are what :func:`build_attention_bias`
    returned; the result is a float mask with -inf where attention is not allowed.
    """
    if position_bias is None:
        return mask, is_causal
    bias = position_bias.to(dtype)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    elif is_causal:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        bias = bias.masked_fill(~causal, float("-inf"))
    return bias, False


def cross_attention_mask(memory_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA mask [B, 1, 1, S] for attending to a memory whose padding is ``memory_padding_mask``.

    A batch row whose memory is all padding may attend to all of it, so that it gives
    finite values rather than NaN.
    """
    if memory_padding_mask is None:
        return None
    mask = memory_padding_mask.bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None, None, :]


class ScaledSelfAttention(SelfAttention):
    """:class:`SelfAttention` with an explicit softmax scale.

    ``scale=None`` is SDPA's 1/sqrt(d_head); T5 uses ``scale=1.0`` (its initialization folds
    the 1/sqrt(d_head) into the query projection).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 scale: float | None = None):
        super().__init__(d_model, n_head, dropout, bias)
        self.scale = scale


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` [B, T, D] to a ``memory`` [B, S, D].

    The encoder–decoder attention of T5 and BART: queries come from the decoder, keys and
    values from the encoder output. ``mask`` is bool [B, 1, T or 1, S] (True = may attend),
    e.g. from :func:`cross_attention_mask`; ``position_bias`` an optional additive
    [1 or B, H, T, S] bias. ``scale`` as in :class:`ScaledSelfAttention`.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 scale: float | None = None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.scale = scale
        self.kv_cache: MemoryKV | None = None  # generation only: the memory's K/V, computed once

    def forward(self, x, memory, mask=None, position_bias=None):
        B, T, D = x.shape
        S = memory.shape[1]
        h = self.n_head
        q = self.q(x).view(B, T, h, D // h).transpose(1, 2)
        cache = self.kv_cache
        if cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k, v = self.kv(memory).split(D, dim=-1)
            k, v = (t.view(B, S, h, D // h).transpose(1, 2) for t in (k, v))
            if cache is not None:
                cache.k, cache.v = k, v
        mask, _ = fold_position_bias(position_bias, mask, False, T, S, q.dtype, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GatedMLP(nn.Module):
    """Gated feed-forward (T5 v1.1 "gated-gelu", GLU variants): proj(act(gate(x)) * fc(x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = {"gelu": nn.GELU(approximate="tanh"), "gelu_exact": nn.GELU(), "relu": nn.ReLU(),
                    "silu": nn.SiLU()}[activation]
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.gate(x)) * self.fc(x)))


class Pooler(nn.Module):
    """BERT's [CLS] pooler: tanh(Linear(hidden[:, 0]))."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class PostLNBlock(nn.Module):
    """Post-LN (BERT/BART/ALBERT) or pre-LN encoder/decoder block.

    Encoder: ``x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))``. With ``cross=True`` (decoder)
    a cross-attention sub-layer ``ln_x(x + cross_attn(x, memory))`` sits between the two.
    ``pre_ln=True`` moves each norm to the sub-layer's input (``x + f(ln(x))``); the model
    then needs a final norm. ``attn``/``mlp``/norms may be passed in to share them between
    blocks (ALBERT).
    """

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float = 0.0, *,
                 activation: str = "gelu_exact", bias: bool = True, eps: float = 1e-5,
                 pre_ln: bool = False, cross: bool = False, attn=None, mlp=None, ln_1=None, ln_2=None):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = attn if attn is not None else SelfAttention(d_model, n_head, dropout, bias)
        self.ln_1 = ln_1 if ln_1 is not None else nn.LayerNorm(d_model, eps=eps, bias=bias)
        if cross:
            self.cross_attn = CrossAttention(d_model, n_head, dropout, bias)
            self.ln_x = nn.LayerNorm(d_model, eps=eps, bias=bias)
        else:
            self.cross_attn = None
        self.mlp = mlp if mlp is not None else MLP(d_model, d_ff, activation, dropout, bias)
        self.ln_2 = ln_2 if ln_2 is not None else nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.drop = nn.Dropout(dropout)

    def _sublayer(self, x, norm, fn):
        if self.pre_ln:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(self, x, mask=None, is_causal=False, memory=None, memory_mask=None, input_pos=None):
        if input_pos is None:
            x = self._sublayer(x, self.ln_1, lambda h: self.attn(h, mask=mask, is_causal=is_causal))
        else:  # generation with a KV cache
            x = self._sublayer(x, self.ln_1, lambda h: self.attn(h, mask=mask, is_causal=is_causal,
                                                                 input_pos=input_pos))
        if self.cross_attn is not None:
            x = self._sublayer(x, self.ln_x, lambda h: self.cross_attn(h, memory, mask=memory_mask))
        # MLP applies its own output dropout.
        if self.pre_ln:
            return x + self.mlp(self.ln_2(x))
        return self.ln_2(x + self.mlp(x))


def require_vocab_size(cfg) -> int:
    """``cfg.vocab_size``, or a clear error when it was left None (it comes from the tokenizer)."""
    if cfg.vocab_size is None:
        raise ValueError(f"{type(cfg).__name__}.vocab_size is None; set it (normally from the tokenizer) first")
    return int(cfg.vocab_size)


def sum_embeddings(input_ids, wte, wpe, wtte=None, token_type_ids=None, max_seq_len=None, position_ids=None):
    """Token + learned position (+ segment, when ``wtte`` is given) embeddings: [B, T, E].

    ``position_ids`` [B, T] default to 0..T-1 (see :func:`document_positions`). Raises a
    ValueError when the sequence is longer than the learned positions.
    """
    T = input_ids.shape[1]
    if max_seq_len is not None and T > max_seq_len:
        raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={max_seq_len}")
    pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
    x = wte(input_ids) + wpe(pos)
    if wtte is not None:
        x = x + wtte(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
    return x
