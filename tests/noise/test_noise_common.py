"""Vectorized building blocks: exact-k selection and compaction."""
from __future__ import annotations

import pytest
import torch
from noise_helpers import gen

from lmkit.noise._common import compact, smallest_k


@pytest.mark.parametrize("k_lo,k_hi", [(0, 3), (2, 2), (5, 5), (0, 9), (7, 9), (9, 9)])
def test_smallest_k_matches_a_full_sort(k_lo, k_hi):
    g = gen(1)
    B, L = 300, 12
    keys = torch.rand(B, L, generator=g, dtype=torch.float64)
    keys[torch.rand(B, L, generator=g) < 0.2] = float("inf")
    finite = torch.isfinite(keys).sum(1)
    k = torch.randint(k_lo, k_hi + 1, (B,), generator=g).clamp(max=finite)
    ranks = keys.argsort(1).argsort(1)
    expected = (ranks < k[:, None]) & torch.isfinite(keys)
    assert torch.equal(smallest_k(keys, k), expected)


def test_compact():
    values = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    keep = torch.tensor([[True, False, True, True], [False, False, False, True]])
    out, n = compact(values, keep, 2, -1)
    assert out.tolist() == [[1, 3], [8, -1]] and n.tolist() == [3, 1]
