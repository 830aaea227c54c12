"""Cutting the block stack into pipeline stages."""
from __future__ import annotations

from functools import lru_cache

from torch import nn

from lmkit.models.base import count_parameters


def block_costs(blocks: list[nn.Module]) -> list[int]:
    """Parameters of each block (a parameter shared by several blocks counts in each: it is computed in each)."""
    return [count_parameters(b.parameters()) for b in blocks]


def balanced_split(costs: list[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Blocks per stage: a contiguous cut into ``n_stages`` non-empty parts minimising the largest part.

    A part's cost is the parameters of its blocks, plus ``first_extra`` for the first stage
    (input embeddings) and ``last_extra`` for the last (output head). Among cuts with the same
    largest part, the one with the smallest sum of squared part costs wins, then the one with
    the most even block counts.
    """
    n = len(costs)
    if n_stages < 1 or n < n_stages:
        raise ValueError(f"cannot cut {n} blocks into {n_stages} non-empty stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def part(stage: int, a: int, b: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == n_stages - 1 else 0)
        return prefix[b] - prefix[a] + extra

    @lru_cache(maxsize=None)
    def best(stage: int, a: int) -> tuple[tuple[int, int, int], tuple[int, ...]]:
        """Best cut of blocks[a:] into stages stage..n_stages-1: ((max, Σ cost², Σ blocks²), sizes)."""
        if stage == n_stages - 1:
            c = part(stage, a, n)
            return (c, c * c, (n - a) ** 2), (n - a,)
        result = None
        remaining = n_stages - stage - 1
        for b in range(a + 1, n - remaining + 1):
            c = part(stage, a, b)
            (mx, sq, even), sizes = best(stage + 1, b)
            key = (max(mx, c), sq + c * c, even + (b - a) ** 2)
            if result is None or key < result[0]:
                result = (key, (b - a,) + sizes)
        return result

    return list(best(0, 0)[1])


def stage_block_ranges(sizes: list[int]) -> list[range]:
    """Block index range of every stage from blocks-per-stage."""
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges
