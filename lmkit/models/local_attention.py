"""GPT-3's alternating dense and locally banded attention (the Sparse Transformer's local band).

``model.attention=alternating_local`` with ``model.attention_window=W`` (gpt and llama): layers
0, 2, 4, ... attend densely (causal); layers 1, 3, 5, ... are *banded*: the query at position ``i``
attends to the keys at positions ``i-W+1 .. i``, the previous ``W`` positions with ``i`` itself
counted among them (``W=1``: each position sees only itself). Every other mask of the model
(padding, ``document_ids``, a prefix-LM ``attn_mask``) still applies: a banded layer attends to
the intersection of that mask with the band. ``model.attention=dense`` (the default) leaves every
layer dense.

A banded layer costs O(T·W) in time and memory, not O(T²): :func:`banded_attention` splits the
queries into blocks of ``W`` and lets each block attend to the keys of its own block and of the
one before (``2W`` keys, which hold the band of each of its queries), all blocks in one
``scaled_dot_product_attention`` call with a [W, 2W] mask per block. Any model mask is read only
on those [W, 2W] blocks (gathered, not multiplied in at T×T). It runs on CPU and GPU, forward and
backward, and under ``torch.compile``. During cached generation (:func:`banded_cached_attention`)
a banded layer reads only the last ``W`` cached keys.

The model constructor marks its banded layers by setting ``attn.window`` (:func:`mark_banded_layers`);
the attention modules call :func:`banded_self_attention` for them and keep their dense path as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError

#: values of ``model.attention``
ATTENTIONS = ("dense", "alternating_local")


def layer_windows(attention: str, window: int | None, n_layer: int) -> list[int | None]:
    """The band width of each layer, None for a dense layer: odd layers are banded with ``alternating_local``."""
    if attention == "dense":
        return [None] * n_layer
    return [int(window) if i % 2 else None for i in range(n_layer)]


def mark_banded_layers(blocks, cfg) -> None:
    """Set ``block.attn.window`` of each block from ``cfg.attention`` / ``cfg.attention_window`` (None = dense)."""
    windows = layer_windows(cfg.attention, cfg.attention_window, len(blocks))
    for block, window in zip(blocks, windows):
        block.attn.window = window


# --- config checks -----------------------------------------------------------------------------


def check_attention(cfg, key: str = "model") -> None:
    """``attention`` is known; ``attention_window`` is an int >= 1 with ``alternating_local`` and null with dense."""
    from lmkit.config.checks import check_choice, check_int

    check_choice(f"{key}.attention", cfg.attention, ATTENTIONS)
    window = cfg.attention_window
    if cfg.attention == "dense":
        if window is not None:
            raise ConfigError(
                f"{key}.attention_window={window!r} has no effect with {key}.attention=dense (every layer attends to "
                f"all earlier positions): set {key}.attention=alternating_local to band the odd layers, or "
                f"{key}.attention_window=null")
        return
    if window is None:
        raise ConfigError(
            f"{key}.attention=alternating_local needs {key}.attention_window, the number of previous positions "
            f"(itself included) each position of a banded layer sees: e.g. {key}.attention_window=128")
    check_int(f"{key}.attention_window", window, minimum=1,
              hint=" (the number of previous positions, itself included, a banded layer's position sees)")
    if cfg.n_layer < 2:
        raise ConfigError(
            f"{key}.attention=alternating_local bands the odd layers (1, 3, ...), and {key}.n_layer={cfg.n_layer} "
            f"has none: use {key}.n_layer=2 or more, or {key}.attention=dense")


def check_window_fits(model_cfg, seq_len: int) -> None:
    """A banded layer's window is shorter than the training rows (``data.seq_len``); else it is a dense layer."""
    window = getattr(model_cfg, "attention_window", None)
    if getattr(model_cfg, "attention", "dense") != "alternating_local" or window is None:
        return
    if window >= seq_len:
        raise ConfigError(
            f"model.attention_window={window} is not shorter than data.seq_len={seq_len}: every position would see "
            f"its whole row, so the banded layers would be dense. Use a model.attention_window below {seq_len}, or "
            f"model.attention=dense")


def refuse_export(cfg, family: str, architecture: str) -> None:
    """Export check: Hugging Face's ``architecture`` has no banded layers, so it cannot hold this model."""
    if getattr(cfg, "attention", "dense") != "dense":
        raise ConfigError(
            f"this {family} model has locally banded attention layers (model.attention={cfg.attention}, "
            f"model.attention_window={cfg.attention_window}): Hugging Face's {architecture} attends densely in "
            f"every layer, so it cannot hold them")


# --- attention ---------------------------------------------------------------------------------


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Bool [Q, K]: query position ``q_pos[i]`` may attend to key position ``k_pos[j]`` (i-W < j <= i)."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window)


def banded_self_attention(q, k, v, window: int, mask=None, dropout_p: float = 0.0, scale=None) -> torch.Tensor:
    """The output [B, H, T, d] of a banded layer: :func:`banded_attention` in training, when the keys are the
    queries' own positions (``k`` as long as ``q``), :func:`banded_cached_attention` when ``k``/``v`` hold a
    KV cache's positions ``0 .. K-1`` and ``q`` the last T of them."""
    if k.shape[2] == q.shape[2]:
        return banded_attention(q, k, v, window, mask, dropout_p, scale)
    return banded_cached_attention(q, k, v, window, mask, dropout_p, scale)


def banded_attention(q, k, v, window: int, mask=None, dropout_p: float = 0.0, scale=None) -> torch.Tensor:
    """Banded causal attention of ``q``/``k``/``v`` [B, H, T, d] (the same T positions) in O(T·W).

    ``mask`` (optional): the model's bool mask, True = may attend, [B or 1, 1, T, T] (as
    :func:`lmkit.models.layers.build_attention_bias` gives it: padding, documents, a prefix-LM mask);
    the result attends to its intersection with the band. None = the band alone.
    """
    B, H, T, d = q.shape
    W = int(window)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"banded attention takes a bool mask, got {mask.dtype}")
    if W >= T:  # the band holds every earlier position: a causal layer (intersected with the model's mask)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal, dropout_p=dropout_p, scale=scale)
    n = -(-T // W)  # query blocks
    pad = n * W - T
    # queries [B*n, H, W, d]; keys/values [B*n, H, 2W, d]: the previous block (zeros before block 0) and its own
    qb = (F.pad(q, (0, 0, 0, pad)) if pad else q).reshape(B, H, n, W, d).transpose(1, 2).reshape(B * n, H, W, d)
    kb, vb = (_key_blocks(t, n, W, pad) for t in (k, v))
    allowed = _block_mask(T, W, n, mask, q.device)  # [B or 1, n, W, 2W]
    allowed = allowed.expand(B, n, W, 2 * W).reshape(B * n, 1, W, 2 * W)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    return y.view(B, n, H, W, d).transpose(1, 2).reshape(B, H, n * W, d)[:, :, :T]


def _key_blocks(t: torch.Tensor, n: int, W: int, pad: int) -> torch.Tensor:
    B, H, _, d = t.shape
    pairs = F.pad(t, (0, 0, W, pad)).unfold(2, 2 * W, W)  # overlapping windows of 2W, a view [B, H, n, d, 2W]
    return pairs.permute(0, 2, 1, 4, 3).reshape(B * n, H, 2 * W, d)


def _block_mask(T: int, W: int, n: int, mask, device) -> torch.Tensor:
    """Bool [B or 1, n, W, 2W]: query ``a`` of block ``b`` (position bW+a) may attend to key ``c`` of its
    key block (position (b-1)W+c)."""
    a = torch.arange(W, device=device)[:, None]
    c = torch.arange(2 * W, device=device)[None, :]
    start = torch.arange(n, device=device)[:, None, None] * W
    q_pos, k_pos = start + a, start - W + c  # [n, W, 1], [n, 1, 2W]
    allowed = (c > a) & (c <= a + W) & (k_pos >= 0)  # the band (k_pos = q_pos - W + 1 .. q_pos), no keys before 0
    if mask is not None:
        m = mask.expand(mask.shape[0], 1, T, T)[:, 0]  # [B or 1, T, T]
        allowed = allowed & m[:, q_pos.clamp(max=T - 1), k_pos.clamp(min=0, max=T - 1)]
    # the queries past T (padding up to a whole block) see themselves, so that no row is empty (NaN)
    return allowed | ((c == a + W) & (q_pos >= T))


def banded_cached_attention(q, k, v, window: int, mask=None, dropout_p: float = 0.0, scale=None) -> torch.Tensor:
    """Banded attention of the queries ``q`` [B, H, T, d] at positions ``K-T .. K-1`` to cached keys/values
    [B, H, K, d] at positions ``0 .. K-1``: only the last W keys of each query are read. ``mask`` (optional,
    bool [.., T, K]) is intersected with the band."""
    T, K = q.shape[2], k.shape[2]
    first = K - T  # the position of the first query
    lo = max(0, first - int(window) + 1)  # the first key any query of this call sees
    k, v = k[:, :, lo:], v[:, :, lo:]
    allowed = None
    if T > 1 or mask is not None:
        q_pos = torch.arange(first, K, device=q.device)
        allowed = band_mask(q_pos, torch.arange(lo, K, device=q.device), window)
        if mask is not None:
            allowed = allowed & mask[..., lo:].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
