"""Helpers shared by the noise-function tests."""
from __future__ import annotations

import math

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


def spanbert_reference_row(word_lens: list[int], rng, mask_prob: float = 0.15, geometric_p: float = 0.2,
                           max_span_words: int = 10, anchor: str = "token") -> tuple[list[bool], list[int]]:
    """Span placement of SpanBERT's ``PairWithSpanMaskingScheme.mask`` for one row, plain Python.

    ``word_lens``: the row's words, as token counts (SpanBERT's sentence without [CLS]/[SEP]).
    ``rng``: a ``random.Random``. Until ``ceil(mask_prob * n)`` tokens are masked: draw a span
    length in words (Geometric(p) truncated at ``max_span_words``), an anchor token uniformly
    (redrawn if already masked), then mask from the start of the anchor's word over that many
    whole words, stopping at the row's end or, token by token, at the budget. Spans may merge.

    ``anchor="word"`` draws the anchor's word uniformly instead (the placement lmkit had before:
    every word equally likely to start a span), for contrast.
    Returns the per-token masked flags and the word each span started at.
    """
    n = sum(word_lens)
    word_of, first_tok = [], []
    for w, length in enumerate(word_lens):
        first_tok.append(len(word_of))
        word_of += [w] * length
    first_tok.append(n)
    weights = [geometric_p * (1 - geometric_p) ** k for k in range(max_span_words)]
    budget = math.ceil(n * mask_prob)
    masked = [False] * n
    count, anchors = 0, []
    while count < budget:
        span_words = rng.choices(range(1, max_span_words + 1), weights=weights)[0]
        tok = rng.randrange(n) if anchor == "token" else first_tok[rng.randrange(len(word_lens))]
        if masked[tok]:
            continue
        w = word_of[tok]
        anchors.append(w)
        for i in range(first_tok[w], first_tok[min(w + span_words, len(word_lens))]):
            if count >= budget:
                break
            if not masked[i]:
                masked[i], count = True, count + 1
    return masked, anchors
