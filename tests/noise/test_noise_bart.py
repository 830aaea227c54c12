"""BART noise: infilling statistics (vs e^-λ and a fairseq port), permutation, rotation, deletion."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from noise_helpers import gen, random_tokens, random_word_starts, z_ok

from lmkit.noise import bart_noise

B, L = 10_000, 128


def batch(vocab, seed=0, batch_size=B, length=L):
    tokens = random_tokens(vocab, batch_size, length, seed=seed)
    tokens[:, 0], tokens[:, -1] = vocab.bos_id, vocab.eos_id
    ws = random_word_starts(batch_size, length, p=0.7, seed=seed)
    ws[:, 1] = True
    return tokens, ws


def unique_rows(vocab, batch_size, length, seed=0):
    """Rows of distinct tokens (so positions can be traced), BOS ... EOS."""
    R = vocab.regular_ids.numel()
    start = torch.randint(R, (batch_size, 1), generator=gen(40 + seed))
    ids = vocab.regular_ids[(start + torch.arange(length)[None, :]) % R]  # distinct while length <= R
    ids[:, 0], ids[:, -1] = vocab.bos_id, vocab.eos_id
    return ids


def real(row, pad):
    return [t for t in row if t != pad]


def is_subsequence(short, long):
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


def test_infilling_zero_length_spans_and_budget(vocab):
    tokens, ws = batch(vocab)
    out = bart_noise(tokens, gen(1), vocab, ws, return_stats=True)
    spans, inserts = out["num_spans"], out["num_inserts"]
    N = int(spans.sum())
    # the last span is cut to the budget but is never of length 0, so by Wald's identity the
    # share of zero-length spans among all spans drawn estimates P(Poisson(3) = 0) = e^-3
    p = math.exp(-3.0)
    assert z_ok(float(inserts.sum()) / N, p, math.sqrt(p * (1 - p) / N))
    words = out["num_words"]
    assert torch.equal(words, ws[:, 1:-1].sum(1))
    budget = torch.ceil(words.double() * 0.3).long()
    # spans are drawn in words until ceil(0.3 · words) is reached; overlapping spans merge, so
    # the distinct words masked are at most the budget (fairseq does the same)
    assert bool((out["masked_words"] <= budget).all())
    assert 0.3 <= float((budget / words).mean()) < 0.31
    assert 0.25 < float((out["masked_words"] / words).mean()) < 0.3
    # BOS / EOS are never noised; labels are the original
    assert bool((out["input_ids"][:, 0] == vocab.bos_id).all())
    n = out["padding_mask"].sum(1)
    assert bool((out["input_ids"].gather(1, (n - 1)[:, None])[:, 0] == vocab.eos_id).all())
    assert torch.equal(out["labels"], tokens)


def test_infilling_matches_fairseq_port(vocab, bench):
    tokens, ws = batch(vocab, seed=1)
    out = bart_noise(tokens, gen(2), vocab, ws, return_stats=True)
    ours_share = (out["masked_words"].double() / out["num_words"]).numpy()
    ours_len = out["padding_mask"].sum(1).double().numpy()
    rng = np.random.default_rng(0)
    ref = [bench.ref_bart(t, w, rng, vocab) for t, w in zip(tokens[:3000].numpy(), ws[:3000].numpy())]
    ref_share = np.array([r["masked_words"] / r["num_words"] for r in ref])
    ref_len = np.array([len(r["input_ids"]) for r in ref], dtype=float)
    for a, b in ((ours_share, ref_share), (ours_len, ref_len)):
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert z_ok(a.mean(), b.mean(), se), (a.mean(), b.mean(), se)


def test_infilling_structure(vocab):
    tokens, ws = batch(vocab, seed=2, batch_size=300)
    out = bart_noise(tokens, gen(3), vocab, ws, random_ratio=0.0)
    for orig, noised in zip(tokens.tolist(), out["input_ids"].tolist()):
        noised = real(noised, vocab.pad_id)
        kept = [t for t in noised if t != vocab.mask_id]
        assert is_subsequence(kept, orig)
        assert vocab.mask_id not in (noised[0], noised[-1])
        if len(kept) < len(orig):
            assert vocab.mask_id in noised
    allrand = bart_noise(tokens, gen(3), vocab, ws, random_ratio=1.0)
    assert not bool((allrand["input_ids"] == vocab.mask_id).any())


def test_random_ratio_of_span_masks(vocab):
    tokens, ws = batch(vocab, seed=6)
    # the same seed gives the same spans and inserts; only the mask-or-random choice differs
    plain = bart_noise(tokens, gen(13), vocab, ws, random_ratio=0.0, return_stats=True)
    mixed = bart_noise(tokens, gen(13), vocab, ws, random_ratio=0.1, return_stats=True)
    assert torch.equal(plain["padding_mask"], mixed["padding_mask"])
    masks0 = int((plain["input_ids"] == vocab.mask_id).sum())
    masks1 = int((mixed["input_ids"] == vocab.mask_id).sum())
    inserts = plain["num_inserts"]
    random_inserts = int(torch.ceil(inserts.double() * 0.1).sum())  # fairseq: ceil(0.1 · inserts)
    span_masks = masks0 - int(inserts.sum())
    replaced_spans = masks0 - masks1 - random_inserts
    assert z_ok(replaced_spans / span_masks, 0.1, math.sqrt(0.09 / span_masks))


def test_packed_documents_keep_their_separators(vocab):
    tokens, ws = batch(vocab, seed=3, batch_size=2000)
    tokens[:, 40] = vocab.eos_id
    tokens[:, 41] = vocab.bos_id
    tokens[:1000, 100:] = vocab.pad_id
    tokens[:1000, 99] = vocab.eos_id
    out = bart_noise(tokens, gen(4), vocab, ws, delete_ratio=0.1)
    for orig, noised in zip(tokens.tolist(), out["input_ids"].tolist()):
        specials = [t for t in real(noised, vocab.pad_id) if t in (vocab.bos_id, vocab.eos_id)]
        assert specials == [t for t in real(orig, vocab.pad_id) if t in (vocab.bos_id, vocab.eos_id)]
    assert torch.equal(out["labels"] == -100, tokens == vocab.pad_id)


def test_insertions_can_lengthen_rows_up_to_L(vocab):
    tokens, ws = batch(vocab, seed=4, batch_size=500, length=32)
    out = bart_noise(tokens, gen(5), vocab, ws, mask_ratio=0.5, poisson_lambda=0.05, return_stats=True)
    assert out["input_ids"].shape == (500, 32)
    assert bool((out["num_inserts"] > 0).all())
    assert int(out["padding_mask"].sum(1).max()) == 32  # longer rows are cut to L


@pytest.mark.parametrize("kw", [
    dict(mask_ratio=0.5, poisson_lambda=0.05),  # inserts outnumber removed tokens: rows grow to L
    dict(mask_ratio=0.9, poisson_lambda=0.05, delete_ratio=0.3, rotate_ratio=1.0),
    dict(mask_ratio=0.9, poisson_lambda=30.0, permute_sentence_ratio=0.5),  # few, long spans
])
def test_padding_only_after_each_row(vocab, kw):
    """Right-padded input rows of random real lengths: every output row is real tokens, then padding
    (no pad id inside a row, none missing at its end), however many masks are inserted."""
    tokens, ws = batch(vocab, seed=6, batch_size=2000, length=32)
    lengths = torch.randint(4, 33, (2000,), generator=gen(6))
    pad = torch.arange(32)[None, :] >= lengths[:, None]
    tokens[torch.arange(2000), lengths - 1] = vocab.eos_id
    tokens[pad] = vocab.pad_id
    ends = torch.zeros_like(ws)
    ends[:, 5::6] = True
    out = bart_noise(tokens, gen(7), vocab, ws, sentence_ends=ends, **kw)
    ids, real_mask = out["input_ids"], out["padding_mask"]
    n_real = real_mask.sum(1, keepdim=True)
    assert torch.equal(real_mask, torch.arange(32)[None, :] < n_real)
    assert not bool((ids[real_mask] == vocab.pad_id).any())
    assert bool((ids[~real_mask] == vocab.pad_id).all())
    assert torch.equal(out["labels"] == -100, pad)


def test_sentence_permutation(vocab):
    n_rows, length = 500, 64
    tokens = unique_rows(vocab, n_rows, length)
    ends = torch.rand(n_rows, length, generator=gen(6)) < 0.15
    out = bart_noise(tokens, gen(7), vocab, torch.ones_like(ends), mask_ratio=0.0,
                     permute_sentence_ratio=1.0, sentence_ends=ends)
    moved_rows = 0
    for orig, noised, e in zip(tokens.tolist(), out["input_ids"].tolist(), ends.tolist()):
        assert noised[0] == vocab.bos_id and noised[-1] == vocab.eos_id
        assert sorted(noised) == sorted(orig)
        where = {t: i for i, t in enumerate(noised)}
        sentences, cur = [], []
        for i in range(1, length - 1):
            cur.append(orig[i])
            if e[i] or i == length - 2:
                sentences.append(cur)
                cur = []
        for s in sentences:  # each sentence stays contiguous and in order
            assert [where[t] for t in s] == list(range(where[s[0]], where[s[0]] + len(s)))
        moved_rows += noised != orig
    assert moved_rows > 0.9 * n_rows

    half = bart_noise(tokens, gen(8), vocab, torch.ones_like(ends), mask_ratio=0.0,
                      permute_sentence_ratio=0.5, sentence_ends=ends)
    for orig, noised, e in zip(tokens.tolist(), half["input_ids"].tolist(), ends.tolist()):
        starts = [1] + [i + 1 for i in range(1, length - 2) if e[i]]
        where = {t: i for i, t in enumerate(noised)}
        slot = sorted(range(len(starts)), key=lambda k: where[orig[starts[k]]])  # sentence in each slot
        moved = sum(k != s for k, s in enumerate(slot))
        assert moved <= math.ceil(0.5 * len(starts))


def test_rotation(vocab):
    n_rows, length = 10_000, 20
    tokens = unique_rows(vocab, n_rows, length, seed=1)
    ws = torch.ones_like(tokens, dtype=torch.bool)
    out = bart_noise(tokens, gen(9), vocab, ws, mask_ratio=0.0, rotate_ratio=1.0)
    inner, noised = tokens[:, 1:-1], out["input_ids"]
    assert torch.equal(noised[:, [0, -1]], tokens[:, [0, -1]])
    shift = (noised[:, 1:2] == inner).long().argmax(1)  # where the new first token came from
    assert torch.equal(torch.roll(inner, 0, 1).gather(1, (torch.arange(length - 2)[None, :] + shift[:, None]) % (length - 2)),
                       noised[:, 1:-1])
    m = length - 2  # fairseq: offset uniform in [1, m + 1], shift = offset − 1 (mod m)
    p0 = 2 / (m + 1)
    assert z_ok(float((shift == 0).double().mean()), p0, math.sqrt(p0 * (1 - p0) / n_rows))
    assert set(shift.tolist()) == set(range(m))
    none = bart_noise(tokens, gen(9), vocab, ws, mask_ratio=0.0, rotate_ratio=0.0)
    assert torch.equal(none["input_ids"], tokens)


def test_token_deletion(vocab):
    tokens, ws = batch(vocab, seed=5)
    out = bart_noise(tokens, gen(10), vocab, ws, mask_ratio=0.0, delete_ratio=0.2)
    n = out["padding_mask"].sum(1)
    deleted = float((L - n).sum())
    N = B * (L - 2)
    assert z_ok(deleted / N, 0.2, math.sqrt(0.2 * 0.8 / N))
    for orig, noised in zip(tokens[:200].tolist(), out["input_ids"][:200].tolist()):
        noised = real(noised, vocab.pad_id)
        assert noised[0] == vocab.bos_id and noised[-1] == vocab.eos_id and is_subsequence(noised, orig)


def test_deterministic(vocab):
    tokens, ws = batch(vocab, batch_size=16)
    ends = torch.rand(16, L, generator=gen(1)) < 0.1
    kw = dict(permute_sentence_ratio=1.0, sentence_ends=ends, rotate_ratio=0.5, delete_ratio=0.1)
    a, b = bart_noise(tokens, gen(11), vocab, ws, **kw), bart_noise(tokens, gen(11), vocab, ws, **kw)
    c = bart_noise(tokens, gen(12), vocab, ws, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("kwargs,match", [
    ({"mask_ratio": 1.0}, "mask_ratio must be below 1"),
    ({"mask_ratio": -0.1}, r"mask_ratio must be in \[0, 1\]"),
    ({"poisson_lambda": 0.0}, "poisson_lambda must be a positive number"),
    ({"random_ratio": 1.5}, "random_ratio"),
    ({"permute_sentence_ratio": 0.5}, "needs sentence_ends"),
    ({"permute_sentence_ratio": 0.5, "sentence_ends": torch.ones(2, 3, dtype=torch.bool)}, "sentence_ends must be a bool tensor shaped like tokens"),
    ({"delete_ratio": 1.0}, "delete_ratio must be below 1"),
    ({"rotate_ratio": 2.0}, "rotate_ratio"),
])
def test_bad_arguments(vocab, kwargs, match):
    tokens, ws = batch(vocab, batch_size=2, length=16)
    with pytest.raises(ValueError, match=match):
        bart_noise(tokens, gen(), vocab, ws, **kwargs)


def test_bad_inputs(vocab):
    tokens, ws = batch(vocab, batch_size=2, length=16)
    with pytest.raises(ValueError, match="word_starts must be a bool tensor shaped like tokens"):
        bart_noise(tokens, gen(), vocab, ws[:, :5])
    left = tokens.clone()
    left[0, 0] = vocab.pad_id
    with pytest.raises(ValueError, match="pad rows on the right"):
        bart_noise(left, gen(), vocab, ws)
