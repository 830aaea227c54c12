"""Helpers shared by the noise-function tests."""
from __future__ import annotations

import torch

from lmkit.noise import NoiseVocab


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tokens(vocab: NoiseVocab, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = gen(10_000 + seed)
    regular = vocab.regular_ids
    return regular[torch.randint(regular.numel(), (batch, length), generator=g)]


def random_word_starts(batch: int, length: int, p: float = 0.7, seed: int = 0) -> torch.Tensor:
    g = gen(20_000 + seed)
    return torch.rand(batch, length, generator=g) < p


def z_ok(observed: float, expected: float, se: float, z: float = 5.0) -> bool:
    """|observed − expected| within ``z`` standard errors (5: a correct implementation fails
    about once in 2 million runs)."""
    return abs(observed - expected) <= z * se
