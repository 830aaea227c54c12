"""SpanBERT masking: span lengths in words, whole words, budget, 80/10/10 per span, SBO indices."""
from __future__ import annotations

import math
import random

import pytest
import torch
from noise_helpers import gen, random_tokens, random_word_starts, spanbert_reference_row, z_ok

from lmkit.noise import expected_span_words, span_length_pmf, spanbert_mask
from lmkit.noise._common import effective_word_starts

B, L = 10_000, 128


def batch(vocab, seed=0, p_start=0.7):
    tokens = random_tokens(vocab, B, L, seed=seed)
    tokens[:, 0], tokens[:, -1] = vocab.cls_id, vocab.sep_id
    return tokens, random_word_starts(B, L, p=p_start, seed=seed)


def runs(mask):
    """(run id per token, -1 outside runs; number of runs per row)."""
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    first = mask & ~prev
    return torch.where(mask, first.long().cumsum(1) - 1, -1), first.sum(1)


def per_run(values, rid, reduce, init):
    R = int(rid.max()) + 1
    out = torch.full((values.shape[0], R + 1), init, dtype=values.dtype)
    return out.scatter_reduce(1, torch.where(rid >= 0, rid, R), values, reduce)[:, :R]


def test_truncated_geometric_pmf():
    pmf = span_length_pmf(0.2, 10)
    assert abs(float(pmf.sum()) - 1) < 1e-12
    assert abs(expected_span_words() - 3.797) < 1e-3  # "mean ≈ 3.8 words"


def test_span_length_distribution_in_words(vocab):
    tokens, ws = batch(vocab)
    out = spanbert_mask(tokens, gen(1), vocab, ws, return_stats=True)
    sampled = out["span_words"][out["span_words"] >= 0].double()
    n = sampled.numel()
    assert n > 30_000
    # spans are taken until the budget is met, a stopping time, so by Wald's identity the
    # sampled lengths of the spans taken (the last before it is shortened) are unbiased
    k = torch.arange(1, 11, dtype=torch.float64)
    pmf = 0.2 * 0.8 ** (k - 1)
    pmf = pmf / pmf.sum()  # SpanBERT's len_distrib, computed here independently of lmkit
    mean = float((pmf * k).sum())
    assert abs(mean - 3.797) < 1e-3
    var = float((pmf * (torch.arange(1, 11, dtype=torch.float64) - mean) ** 2).sum())
    assert z_ok(float(sampled.mean()), mean, math.sqrt(var / n))
    for j in range(1, 11):
        p = float(pmf[j - 1])
        assert z_ok(float((sampled == j).double().mean()), p, math.sqrt(p * (1 - p) / n)), j
    # only the last span taken in a row may be shortened, never lengthened
    used, sw = out["span_words_used"], out["span_words"]
    shortened = (used != sw).sum(1)
    assert int(shortened.max()) <= 1 and bool((used <= sw).all())


def _ratio(num, den) -> tuple[float, float]:
    """sum(num) / sum(den) over independent rows, and its standard error (delta method)."""
    num, den = torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)
    r = num.sum() / den.sum()
    return float(r), float((num - r * den).std() / den.mean() / math.sqrt(num.numel()))


def test_span_anchor_word_weighted_by_its_tokens(vocab):
    """SpanBERT anchors a span at a uniformly random token, so a word starts a span in
    proportion to its token count: long words are masked more often than their share. Words
    of 1 or 2 tokens (mean 1.25): about 39% of spans start at a 2-token word, not 25%, and a
    masked word has 1.29 tokens on average, not 1.25 (here: SpanBERT's rule 1.293, lmkit 1.290;
    uniform over words, as lmkit placed spans before, 1.250)."""
    n = L - 2
    g = gen(11)
    two = torch.rand(B, n, generator=g) < 0.25
    lens = 1 + two.long()
    first_tok = lens.cumsum(1) - lens
    inner = torch.zeros(B, n, dtype=torch.bool)
    inner.scatter_(1, torch.where(first_tok < n, first_tok, 0), first_tok < n)
    inner[:, 0] = True  # (column 0 also took the words past the row; the last word may be cut to 1 token)
    ws = torch.ones(B, L, dtype=torch.bool)
    ws[:, 1:-1] = inner
    tokens = random_tokens(vocab, B, L, seed=11)
    tokens[:, 0], tokens[:, -1] = vocab.cls_id, vocab.sep_id

    # lmkit: the token count of each word with a masked token, and of each span's first word
    masked = (spanbert_mask(tokens, gen(12), vocab, ws)["labels"] != -100)[:, 1:-1]
    word = inner.long().cumsum(1) - 1
    word_len = torch.zeros(B, n, dtype=torch.long).scatter_add_(1, word, torch.ones_like(word))
    hit = torch.zeros(B, n, dtype=torch.long).scatter_add_(1, word, masked.long()) > 0
    got_tok = _ratio((word_len * hit).sum(1), hit.sum(1))
    prev = torch.zeros_like(masked)
    prev[:, 1:] = masked[:, :-1]
    span_first = masked & ~prev  # spans never touch: a run of masked tokens is one span
    got_two = _ratio((span_first & (word_len.gather(1, word) == 2)).sum(1), span_first.sum(1))

    def reference(anchor):
        rng = random.Random(13)
        tok, words, two_first, spans = [], [], [], []
        for row in inner.tolist():
            starts = [i for i, s in enumerate(row) if s] + [n]
            wl = [b - a for a, b in zip(starts, starts[1:])]
            flags, anchors = spanbert_reference_row(wl, rng, anchor=anchor)
            masked_word = [any(flags[a:b]) for a, b in zip(starts, starts[1:])]
            tok.append(sum(x for x, h in zip(wl, masked_word) if h))
            words.append(sum(masked_word))
            two_first.append(sum(wl[w] == 2 for w in anchors))
            spans.append(len(anchors))
        return _ratio(tok, words), _ratio(two_first, spans)

    ref_tok, ref_two = reference("token")
    uni_tok, uni_two = reference("word")
    assert 1.27 < ref_tok[0] < 1.32 and 0.37 < ref_two[0] < 0.41, (ref_tok, ref_two)
    for got, ref, uni in ((got_tok, ref_tok, uni_tok), (got_two, ref_two, uni_two)):
        se = math.hypot(got[1], ref[1])
        assert z_ok(got[0], ref[0], se), (got, ref)
        # the test tells the rules apart: uniform over words is far off
        assert abs(uni[0] - ref[0]) > 10 * math.hypot(uni[1], ref[1]), (uni, ref)
        assert abs(got[0] - uni[0]) > 10 * math.hypot(got[1], uni[1]), (got, uni)


def test_spans_are_whole_words_within_budget(vocab):
    tokens, ws = batch(vocab, seed=1)
    out = spanbert_mask(tokens, gen(2), vocab, ws, return_stats=True)
    masked = out["labels"] != -100
    assert torch.equal(out["labels"][masked], tokens[masked])
    assert not bool(vocab.special_table[tokens][masked].any())
    eligible = ~vocab.special_table[tokens]
    starts = effective_word_starts(eligible, ws)
    prev = torch.zeros_like(masked)
    prev[:, 1:] = masked[:, :-1]
    nxt_start = torch.ones_like(masked)
    nxt_start[:, :-1] = starts[:, 1:] | ~eligible[:, 1:]
    nxt = torch.zeros_like(masked)
    nxt[:, :-1] = masked[:, 1:]
    assert bool(starts[masked & ~prev].all())  # a span begins at a word start
    assert bool(nxt_start[masked & ~nxt].all())  # and ends where a word ends
    rid, n_runs = runs(masked)
    words = per_run((starts & masked).long(), rid, "sum", 0)
    assert int(words.max()) <= 10
    used = out["span_words_used"]
    assert torch.equal(n_runs, (used > 0).sum(1))  # spans never touch or merge
    assert torch.equal((starts & masked).sum(1), used.clamp(min=0).sum(1))
    count, budget = masked.sum(1), out["budget"]
    assert torch.equal(budget, torch.ceil(eligible.sum(1) * 0.15).long())
    assert bool((count >= budget).all())
    # whole words may overshoot by less than one word (words here are short)
    assert int((count - budget).max()) < 10


def test_exact_budget_with_one_token_words(vocab):
    tokens, _ = batch(vocab, seed=2)
    out = spanbert_mask(tokens, gen(3), vocab, torch.ones_like(tokens, dtype=torch.bool))
    assert torch.equal((out["labels"] != -100).sum(1), torch.full((B,), math.ceil(126 * 0.15)))


def test_short_rows_reach_the_budget(vocab):
    n_rows, length = 5000, 22
    tokens = random_tokens(vocab, n_rows, length, seed=6)
    n = torch.randint(3, length + 1, (n_rows,), generator=gen(7))
    pos = torch.arange(length)[None, :]
    tokens[:, 0] = vocab.cls_id
    tokens[pos == (n - 1)[:, None]] = vocab.sep_id
    tokens[pos >= n[:, None]] = vocab.pad_id
    ws = random_word_starts(n_rows, length, p=0.5, seed=6)
    out = spanbert_mask(tokens, gen(8), vocab, ws, return_stats=True)
    masked = out["labels"] != -100
    assert bool((masked.sum(1) >= out["budget"]).all())
    assert torch.equal(out["budget"], torch.ceil((n - 2) * 0.15).long())
    assert not bool((masked & (tokens == vocab.pad_id)).any())


@pytest.mark.parametrize("mask_prob", [0.3, 0.6, 0.9])
def test_crowded_rows_with_specials_and_padding(vocab, mask_prob):
    """Dense masking leaves no room for spans one word apart: spans are shortened to the free
    stretches, then single words fill the budget; specials inside rows and padding stay."""
    n_rows, length = 400, 64
    tokens = random_tokens(vocab, n_rows, length, seed=7)
    inside = torch.rand(n_rows, length, generator=gen(17)) < 0.05
    tokens[inside] = vocab.sep_id
    n = torch.randint(1, length + 1, (n_rows,), generator=gen(18))
    tokens[torch.arange(length)[None, :] >= n[:, None]] = vocab.pad_id
    ws = random_word_starts(n_rows, length, p=0.6, seed=7)
    out = spanbert_mask(tokens, gen(19), vocab, ws, mask_prob=mask_prob, return_stats=True)
    masked = out["labels"] != -100
    eligible = ~vocab.special_table[tokens] & (tokens != vocab.pad_id)
    assert not bool((masked & ~eligible).any())
    assert torch.equal(out["budget"], torch.ceil(eligible.sum(1).double() * mask_prob).long())
    assert bool((masked.sum(1) >= out["budget"]).all())
    word = effective_word_starts(eligible, ws).long().cumsum(1)  # whole words only
    per_word = torch.zeros(n_rows, length + 1, dtype=torch.long)
    hit = per_word.scatter_add(1, word, (masked & eligible).long())
    size = per_word.scatter_add(1, word, eligible.long())
    assert bool(((hit == 0) | (hit == size))[:, 1:].all())
    assert int(out["span_words_used"].max()) <= 10


def test_80_10_10_once_per_span(vocab):
    tokens, ws = batch(vocab, seed=3)
    out = spanbert_mask(tokens, gen(4), vocab, ws)
    masked = out["labels"] != -100
    rid, _ = runs(masked)
    is_mask = (out["input_ids"] == vocab.mask_id).long()
    same = (out["input_ids"] == tokens).long()
    all_mask = per_run(is_mask, rid, "amin", 1)
    any_mask = per_run(is_mask, rid, "amax", 0)
    all_same = per_run(same, rid, "amin", 1)
    valid = per_run(masked.long(), rid, "amax", 0) == 1
    assert torch.equal(all_mask[valid], any_mask[valid])  # one decision per span
    n = int(valid.sum())
    p_mask = float(all_mask[valid].double().mean())
    p_same = float(all_same[valid].double().mean())
    for got, p in ((p_mask, 0.8), (p_same, 0.1), (1 - p_mask - p_same, 0.1)):
        assert z_ok(got, p, math.sqrt(p * (1 - p) / n)), (got, p)


def test_sbo_indices(vocab):
    tokens, ws = batch(vocab, seed=4)
    out = spanbert_mask(tokens, gen(5), vocab, ws)
    masked = out["labels"] != -100
    left, right, pos = out["span_left"], out["span_right"], out["span_pos"]
    assert bool((left[masked] >= 0).all())  # [CLS] / [SEP] give every span a boundary
    assert bool((left[~masked] == -1).all() and (right[~masked] == -1).all() and (pos[~masked] == -1).all())
    t = torch.arange(L).expand(B, L)
    assert torch.equal(pos[masked], (t - left - 1)[masked])
    assert not bool(masked.gather(1, left.clamp(min=0))[masked].any())
    assert not bool(masked.gather(1, right.clamp(min=0))[masked].any())
    # every token between the boundaries is masked: span length = right - left - 1
    rid, _ = runs(masked)
    size = per_run(masked.long(), rid, "sum", 0)
    assert torch.equal((right - left - 1)[masked], size.gather(1, rid.clamp(min=0))[masked])


def test_spans_touching_the_edge_have_no_sbo_target(vocab):
    tokens = random_tokens(vocab, 2000, 12, seed=5)  # no [CLS]/[SEP]: spans can touch the edges
    out = spanbert_mask(tokens, gen(6), vocab, torch.ones_like(tokens, dtype=torch.bool))
    masked = out["labels"] != -100
    edge = masked[:, 0]
    assert bool(edge.any()) and bool((out["span_left"][edge, 0] == -1).all())


def test_deterministic(vocab):
    tokens, ws = batch(vocab)
    tokens, ws = tokens[:16], ws[:16]
    a, b = spanbert_mask(tokens, gen(9), vocab, ws), spanbert_mask(tokens, gen(9), vocab, ws)
    c = spanbert_mask(tokens, gen(10), vocab, ws)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])


@pytest.mark.parametrize("kwargs,match", [
    ({"mask_prob": 0.0}, "mask_prob must be strictly between 0 and 1"),
    ({"geometric_p": 1.0}, "geometric_p"),
    ({"max_span_words": 0}, "max_span_words must be a positive int"),
    ({"mask_token_frac": 0.95, "random_token_frac": 0.1}, "exceeds 1"),
    ({"word_starts": None}, "word_starts is required"),
])
def test_bad_arguments(vocab, kwargs, match):
    tokens = random_tokens(vocab, 2, 16)
    kwargs = {"word_starts": torch.ones_like(tokens, dtype=torch.bool), **kwargs}
    with pytest.raises(ValueError, match=match):
        spanbert_mask(tokens, gen(), vocab, **kwargs)
