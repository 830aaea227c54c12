"""MLM noise: selected counts per mode, 80/10/10, specials never selected, whole words."""
from __future__ import annotations

import math

import pytest
import torch
from noise_helpers import gen, random_tokens, random_word_starts, z_ok

from lmkit.noise import mlm_mask
from lmkit.noise._common import effective_word_starts, word_index

B, L = 10_000, 128


def bert_batch(vocab, seed=0):
    """[CLS] ... [SEP] rows with varied lengths (right padding) and a few inner specials."""
    tokens = random_tokens(vocab, B, L, seed=seed)
    tokens[:, 0] = vocab.cls_id
    g = gen(30 + seed)
    n = torch.randint(20, L + 1, (B,), generator=g)  # real lengths, so round(0.15 n) varies
    pos = torch.arange(L)[None, :]
    tokens[pos == (n - 1)[:, None]] = vocab.sep_id
    inner = torch.rand(B, L, generator=g) < 0.02
    tokens[inner & (pos > 0) & (pos < (n - 1)[:, None])] = vocab.sep_id
    tokens[pos >= n[:, None]] = vocab.pad_id
    return tokens


def candidates(tokens, vocab):
    return ~vocab.special_table[tokens] & (tokens != vocab.pad_id)


def test_exact_count_per_row(vocab):
    tokens = bert_batch(vocab)
    out = mlm_mask(tokens, gen(1), vocab, mode="exact", max_predictions=16)
    n = candidates(tokens, vocab).sum(1)
    expected = torch.tensor([min(16, max(1, round(0.15 * k))) for k in n.tolist()])
    assert torch.equal((out["labels"] != -100).sum(1), expected)
    out = mlm_mask(tokens, gen(1), vocab, mode="exact")
    expected = torch.tensor([max(1, round(0.15 * k)) for k in n.tolist()])
    assert torch.equal((out["labels"] != -100).sum(1), expected)


def test_roberta_count_mean_and_support(vocab):
    tokens = bert_batch(vocab, seed=1)
    out = mlm_mask(tokens, gen(2), vocab, mode="roberta")
    n = candidates(tokens, vocab).sum(1).double()
    count = (out["labels"] != -100).sum(1).double()
    base = torch.floor(0.15 * n)
    assert bool(((count == base) | (count == base + 1)).all())
    frac = 0.15 * n - base  # P(count = base + 1)
    se = math.sqrt(float((frac * (1 - frac)).sum()))
    assert z_ok(float(count.sum()), float((0.15 * n).sum()), se)  # E[int(p·n + U)] = p·n exactly
    # and per length: P(one more) is the fractional part of 0.15·n (3n/20), not a rounding
    up = count == base + 1
    for r in range(20):
        rows = (n.long() % 20) == r
        f = (3 * r % 20) / 20
        m = int(rows.sum())
        assert z_ok(float(up[rows].double().mean()), f, math.sqrt(f * (1 - f) / m) + 1e-12), (r, f)


def test_bernoulli_count(vocab):
    tokens = bert_batch(vocab, seed=2)
    out = mlm_mask(tokens, gen(3), vocab, mode="bernoulli")
    n = float(candidates(tokens, vocab).sum())
    total = float((out["labels"] != -100).sum())
    assert z_ok(total, 0.15 * n, math.sqrt(n * 0.15 * 0.85))
    # independent draws: per-row counts spread like Binomial(n, 0.15) (an exact count would not)
    n_row = candidates(tokens, vocab).sum(1).double()
    count = (out["labels"] != -100).sum(1).double()
    dev2 = float(((count - 0.15 * n_row) ** 2).sum())
    var = float((n_row * 0.15 * 0.85).sum())
    assert z_ok(dev2, var, math.sqrt(2 * float(((n_row * 0.15 * 0.85) ** 2).sum()) + float((n_row * 0.15 * 0.85).sum())))
    capped = mlm_mask(tokens, gen(3), vocab, mode="bernoulli", max_predictions=5)
    assert int((capped["labels"] != -100).sum(1).max()) <= 5


@pytest.mark.parametrize("mode", ["exact", "roberta", "bernoulli"])
def test_80_10_10_and_specials_never_selected(vocab, mode):
    tokens = bert_batch(vocab, seed=3)
    out = mlm_mask(tokens, gen(4), vocab, mode=mode)
    sel = out["labels"] != -100
    assert torch.equal(out["labels"][sel], tokens[sel])
    assert not bool((sel & ~candidates(tokens, vocab)).any())  # no [CLS]/[SEP]/[PAD] selected
    assert torch.equal(out["input_ids"][~sel], tokens[~sel])
    assert torch.equal(out["padding_mask"], tokens != vocab.pad_id)
    inp = out["input_ids"][sel]
    n = inp.numel()
    masked = float((inp == vocab.mask_id).double().mean())
    kept = float((inp == tokens[sel]).double().mean())
    randomized = 1 - masked - kept
    p_same = 1 / vocab.regular_ids.numel()  # a random draw can hit the original token
    for got, p in ((masked, 0.8), (kept, 0.1 + 0.1 * p_same), (randomized, 0.1 * (1 - p_same))):
        assert z_ok(got, p, math.sqrt(p * (1 - p) / n)), (mode, got, p)
    replaced = inp[(inp != vocab.mask_id) & (inp != tokens[sel])]
    assert not bool(vocab.special_table[replaced].any())  # random tokens are never special


def _word_selection(tokens, ws, sel, vocab):
    cand = candidates(tokens, vocab)
    starts = effective_word_starts(cand, ws)
    widx = word_index(cand, starts)
    W = int(starts.sum(1).max())
    idx = torch.where(cand, widx, W)
    lo = torch.ones(tokens.shape[0], W + 1, dtype=torch.long).scatter_reduce(1, idx, sel.long(), "amin")
    hi = torch.zeros(tokens.shape[0], W + 1, dtype=torch.long).scatter_reduce(1, idx, sel.long(), "amax")
    length = torch.zeros(tokens.shape[0], W + 1, dtype=torch.long).scatter_add(1, idx, cand.long())
    valid = torch.arange(W + 1)[None, :] < starts.sum(1)[:, None]
    return lo[:, :W], hi[:, :W], length[:, :W], valid[:, :W]


@pytest.mark.parametrize("mode", ["exact", "roberta", "bernoulli"])
def test_whole_word(vocab, mode):
    tokens = bert_batch(vocab, seed=4)
    ws = random_word_starts(B, L, p=0.6, seed=4)
    out = mlm_mask(tokens, gen(5), vocab, mode=mode, whole_word=True, word_starts=ws)
    sel = out["labels"] != -100
    assert not bool((sel & ~candidates(tokens, vocab)).any())
    lo, hi, length, valid = _word_selection(tokens, ws, sel, vocab)
    assert torch.equal(lo[valid], hi[valid])  # every word whole or not at all
    word_sel = (hi == 1) & valid
    n_words = valid.sum(1).double()
    n_tok = candidates(tokens, vocab).sum(1)
    count = sel.sum(1)
    if mode == "exact":
        budget = torch.tensor([max(1, round(0.15 * k)) for k in n_tok.tolist()])
        assert bool((count <= budget).all())
        # BERT's greedy fill: no unselected word still fits in what is left of the budget
        slack = (budget - count)[:, None]
        assert not bool((valid & ~word_sel & (length <= slack)).any())
        assert float(count.sum()) > 0.98 * float(budget.sum())
    elif mode == "roberta":
        k = word_sel.sum(1).double()
        base = torch.floor(0.15 * n_words)
        assert bool(((k == base) | (k == base + 1)).all())
        frac = 0.15 * n_words - base
        assert z_ok(float(k.sum()), float((0.15 * n_words).sum()), math.sqrt(float((frac * (1 - frac)).sum())))
    else:
        N = float(n_words.sum())
        assert z_ok(float(word_sel.sum()), 0.15 * N, math.sqrt(N * 0.15 * 0.85))


def test_exact_matches_bert_reference_counts(vocab, bench):
    import numpy as np
    tokens = bert_batch(vocab, seed=5)[:200]
    rng = np.random.default_rng(0)
    ours = (mlm_mask(tokens, gen(6), vocab)["labels"] != -100).sum(1)
    ref = [int((bench.ref_mlm(row[row != vocab.pad_id], rng, vocab)["labels"] != -100).sum()) for row in tokens.numpy()]
    assert ours.tolist() == ref


def test_deterministic(vocab):
    tokens = bert_batch(vocab)[:16]
    ws = random_word_starts(16, L)
    for kw in ({}, {"whole_word": True, "word_starts": ws}):
        a, b = mlm_mask(tokens, gen(9), vocab, **kw), mlm_mask(tokens, gen(9), vocab, **kw)
        c = mlm_mask(tokens, gen(10), vocab, **kw)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["labels"], c["labels"])


@pytest.mark.parametrize("kwargs,match", [
    ({"mask_prob": 0.0}, "mask_prob must be strictly between 0 and 1"),
    ({"mask_prob": 1.5}, "mask_prob"),
    ({"mode": "random"}, "mode must be one of"),
    ({"max_predictions": 0}, "max_predictions must be a positive int"),
    ({"whole_word": True}, "word_starts is required"),
    ({"whole_word": True, "word_starts": torch.ones(3, 3, dtype=torch.bool)}, "shaped like tokens"),
    ({"mask_token_frac": 0.9, "random_token_frac": 0.2}, "exceeds 1"),
    ({"random_token_frac": -0.1}, r"random_token_frac must be in \[0, 1\]"),
])
def test_bad_arguments(vocab, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlm_mask(random_tokens(vocab, 2, 16), gen(), vocab, **kwargs)
