"""XLNet's permutation language modelling: n-gram targets, a factorization order, two-stream masks.

Follows zihangdai/xlnet ``data_utils.py`` (``_sample_mask`` and ``_local_perm``):

* **Targets**: spans of n tokens, n ∈ {1..max_gram} with p(n) ∝ 1/n, each placed at a uniform
  offset inside a window of n·(1 + alpha) tokens (``mask_alpha=6, mask_beta=1``: one span per
  seven tokens on average), consecutive windows tiling the row; the last span is cut to reach
  the goal and random single tokens top it up, so exactly ``goal = round(L / K)`` tokens of every
  row are predicted (85 of 512 for K = 6). Special tokens are never targets.
* **Factorization order**: every non-target comes first (rank −1: they see each other and
  are seen by all), the targets after them in a uniformly random order (rank 0, 1, ...): the
  targets are the last ≈1/K of the factorization order, XLNet's partial prediction.
* **Masks** (True = may attend): the query stream of i sees j iff rank(j) < rank(i), or j is
  not a target, and never i itself when i is a target; the content stream sees the same and
  itself. A target's own content therefore reaches its prediction through no path.

The reference aligns spans to SentencePiece word starts; here spans are token-level.
"""
from __future__ import annotations

import torch

from lmkit.noise.vocab import NoiseVocab


def plm_goal(length: int, k: float) -> int:
    """Number of predicted tokens of a row of ``length`` tokens: round(length / K), at least 1."""
    return max(1, int(round(length / k)))


def plm_targets(tokens: torch.Tensor, gen: torch.Generator, vocab: NoiseVocab, k: float = 6.0,
                max_gram: int = 5, alpha: int = 6) -> torch.Tensor:
    """Bool [B, L]: the positions to predict, ``plm_goal(L, k)`` per row (fewer only when a row has
    fewer non-special tokens). Vectorized over rows and spans."""
    B, L = tokens.shape
    goal = plm_goal(L, k)
    candidate = ~vocab.special_table[tokens]
    # every span window holds >= 1 + alpha tokens, so no more than this many start inside a row
    slots = L // (1 + alpha) + 2
    p = 1.0 / torch.arange(1, max_gram + 1, dtype=torch.float64)
    n = torch.multinomial((p / p.sum()).float().expand(B * slots, max_gram), 1, generator=gen).view(B, slots) + 1
    before = n.cumsum(1) - n  # tokens of the untruncated spans before each one
    n = torch.minimum(n, (goal - before).clamp(min=0))  # the span that reaches the goal is cut, later ones vanish
    ctx = n * alpha
    left = (torch.rand(B, slots, generator=gen) * ctx).long()  # uniform in [0, ctx)
    start = (n + ctx).cumsum(1) - (n + ctx)
    beg, end = start + left, start + left + n
    keep = (n > 0) & (end < L)  # the reference stops at the first span that does not end inside the row
    edges = torch.zeros(B, L + 1, dtype=torch.long)
    edges.scatter_add_(1, torch.where(keep, beg, L), keep.long())
    edges.scatter_add_(1, torch.where(keep, end, L), -keep.long())
    chosen = (edges[:, :L].cumsum(1) > 0) & candidate
    # top up with random single tokens until each row has `goal`
    need = (goal - chosen.sum(1)).clamp(min=0)
    scores = torch.rand(B, L, generator=gen).masked_fill(chosen | ~candidate, 2.0)
    order = scores.argsort(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L).expand(B, L))
    return chosen | ((rank < need[:, None]) & candidate & ~chosen)


def factorization_ranks(targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Int64 [B, L]: −1 for non-targets (first in the order), a random order 0..n−1 over each row's targets."""
    B, L = targets.shape
    scores = torch.rand(B, L, generator=gen).masked_fill(~targets, 2.0)
    order = scores.argsort(1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(L).expand(B, L))
    return torch.where(targets, ranks, -1)


def two_stream_masks(ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(content, query)`` bool [B, L, L] masks, True = position i may attend to j.

    j is visible to i's query stream when j is not a target (rank −1) or comes earlier in the
    factorization order; a non-target (rank −1) sees only non-targets. The content stream also
    sees itself.
    """
    # XLNet's perm_mask blocks j when self_rank(i) <= rank(j) and j is a target (self_rank = rank + 1
    # for non-targets): with non-targets at rank -1 that is one comparison per stream.
    content = ranks[:, None, :] <= ranks[:, :, None]
    query = ranks[:, None, :] < ranks.clamp(min=0)[:, :, None]
    return content, query


def plm_noise(tokens: torch.Tensor, gen: torch.Generator, vocab: NoiseVocab, k: float = 6.0,
              max_gram: int = 5, alpha: int = 6) -> dict[str, torch.Tensor]:
    """Inputs of XLNet's PLM for blocks [B, L]: the tokens unchanged (no [MASK] in the inputs),
    ``labels`` (the token at targets, −100 elsewhere), ``target_mask`` and ``perm_ranks``
    (see :func:`factorization_ranks`; the model builds the masks with :func:`two_stream_masks`)."""
    targets = plm_targets(tokens, gen, vocab, k, max_gram, alpha)
    ranks = factorization_ranks(targets, gen)
    labels = torch.where(targets, tokens, -100)
    return {"input_ids": tokens, "labels": labels, "target_mask": targets, "perm_ranks": ranks}
