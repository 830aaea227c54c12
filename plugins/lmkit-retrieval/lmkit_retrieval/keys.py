"""How a store turns embeddings into index keys: center (default), whiten or raw, then L2-normalise.

Mean-pooled states of a small or briefly trained encoder can be strongly anisotropic: they share
one large common component, and every pair of chunks has cosine ≈ 1. With lmkit's
``bert_tiny`` trained 100 MLM steps, the per-dimension spread across chunks is 8e-4 against a
mean of 0.78, all pairwise cosines are ≥ 0.99999, and in float32 (faiss) a chunk retrieves itself
for only 0.8% of queries: neighbours are effectively random. Subtracting the store's mean
embedding before normalising restores it (99.4%, the rest are repeated chunks), as do the
post-processing fixes for anisotropic sentence embeddings (Ethayarajh 2019; BERT-whitening,
Su et al. 2021).

A transform is one float32 array ``[d + 1, d]``: row 0 the mean μ, rows 1.. a matrix W; a key is
``normalise((x − μ) W)``.

* ``center``: μ = the mean of the store's embeddings, W = I;
* ``whiten``: μ as center, W = V diag(λ^-½) from the eigendecomposition of the embeddings'
  covariance, so keys have identity covariance before normalising; directions with
  λ ≤ 1e-6·λ_max (the encoder's null space, e.g. a LayerNorm's) are dropped (zero columns);
* ``raw``: μ = 0, W = I (plain cosine of the embeddings).

The transform is fitted once, on the store's embeddings, in float64 over blocks (bounded
memory, deterministic), and applied to every query the store is searched with.
"""
from __future__ import annotations

import numpy as np

from lmkit.config.checks import check_choice

KEY_MODES = ("center", "whiten", "raw")
_BLOCK = 65536
_NULL_SPACE = 1e-6  # eigenvalues at most this fraction of the largest are treated as 0 when whitening


def fit_key_transform(vectors, mode: str = "center") -> np.ndarray:
    """float32 ``[d + 1, d]``: the ``mode`` transform (see the module docstring) fitted on ``vectors`` [n, d]
    (any float array, e.g. a memmap, read ``_BLOCK`` rows at a time)."""
    check_choice("keys", mode, KEY_MODES)
    n, d = vectors.shape
    out = np.zeros((d + 1, d), dtype=np.float64)
    out[1:] = np.eye(d)
    if mode == "raw":
        return out.astype(np.float32)
    total = np.zeros(d, dtype=np.float64)
    for start in range(0, n, _BLOCK):
        total += np.asarray(vectors[start:start + _BLOCK], dtype=np.float64).sum(0)
    mean = total / n
    out[0] = mean
    if mode == "whiten":
        cov = np.zeros((d, d), dtype=np.float64)
        for start in range(0, n, _BLOCK):
            x = np.asarray(vectors[start:start + _BLOCK], dtype=np.float64) - mean
            cov += x.T @ x
        cov /= max(n - 1, 1)
        eigvals, eigvecs = np.linalg.eigh(cov)
        keep = eigvals > _NULL_SPACE * max(float(eigvals.max()), 0.0)
        scale = np.zeros_like(eigvals)
        scale[keep] = 1.0 / np.sqrt(eigvals[keep])
        out[1:] = eigvecs * scale
    return out.astype(np.float32)


def key_parts(transform: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(μ, W)`` of a transform, W None where it is the identity (center, raw): the matmul is then skipped."""
    mean, w = transform[0], transform[1:]
    return mean, None if np.array_equal(w, np.eye(len(w), dtype=w.dtype)) else w


def to_keys(x, mean: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """float32 C-contiguous unit rows ``normalise((x − μ) W)`` of ``x`` [n, d] (zero rows stay zero)."""
    from lmkit_retrieval.index import normalized

    out = np.asarray(x, dtype=np.float32) - mean
    return normalized(out if w is None else out @ w)
