"""Vectorized building blocks: exact-k selection and compaction."""
from __future__ import annotations

from math import comb

import pytest
import torch
from noise_helpers import gen

from lmkit.noise._common import compact, random_subset, smallest_k


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


@pytest.mark.parametrize("n,k", [(10, 3), (10, 8)])  # rejection path (k² <= 4n) and random-keys path
def test_random_subset_uniform(n, k):
    B = 60_000
    sub = random_subset(torch.full((B,), n), torch.full((B,), k), gen(2))
    assert sub.shape == (B, k)
    assert bool((sub[:, 1:] > sub[:, :-1]).all()) and bool((sub >= 0).all()) and bool((sub < n).all())
    # every k-subset equally likely: check the frequency of each subset
    code = (1 << sub).sum(1)
    counts = torch.bincount(code, minlength=1 << n).double()
    p = 1 / comb(n, k)
    se = (p * (1 - p) / B) ** 0.5
    freq = counts[counts > 0] / B
    assert freq.numel() == comb(n, k)
    assert float((freq - p).abs().max()) <= 5.5 * se  # max over C(n, k) subsets


def test_random_subset_ragged():
    n = torch.tensor([5, 40, 7, 0])
    k = torch.tensor([2, 4, 0, 0])
    sub = random_subset(n, k, gen(3))
    assert sub.shape == (4, 4)
    for row, ni, ki in zip(sub.tolist(), n.tolist(), k.tolist()):
        assert row[ki:] == [ni] * (4 - ki)  # padded with n
        assert len(set(row[:ki])) == ki and all(0 <= v < ni for v in row[:ki]) and row[:ki] == sorted(row[:ki])
