"""T5 span corruption: exact counts, lengths, sentinels, reconstruction, distribution."""
from __future__ import annotations

import math

import pytest
import torch
from noise_helpers import gen, random_tokens, z_ok

from lmkit.noise import NoiseVocab, random_spans_helper, random_spans_noise_mask, reconstruct, span_corruption


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                           extra_tokens_per_span_inputs, extra_tokens_per_span_targets):
    """Verbatim arithmetic of t5/data/preprocessors.py ``random_spans_helper``."""
    def _tokens_length_to_inputs_length_targets_length(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
                num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while _tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def test_random_spans_helper_known_values():
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert random_spans_helper(128, 0.15, 3.0) == (141, 29)


@pytest.mark.parametrize("inputs_length", [16, 64, 128, 512, 626, 1024])
@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 3.0), (0.15, 8.0), (0.5, 64.0), (0.25, 1.0)])
def test_random_spans_helper_matches_t5(inputs_length, density, mean):
    for extra in (1, 2):
        assert random_spans_helper(inputs_length, density, mean, extra, 1) == \
            t5_random_spans_helper(inputs_length, density, mean, extra, 1)


def _runs(mask: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of True in each row, int64 [B, max runs] (0 past the last)."""
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    first = mask & ~prev
    k = int(first.sum(1).max())
    idx = torch.where(mask, first.long().cumsum(1) - 1, k)
    out = torch.zeros(mask.shape[0], k + 1, dtype=torch.long)
    out.scatter_add_(1, idx, mask.long())
    return out[:, :k]


def test_exact_counts_lengths_and_sentinels_at_568(vocab):
    B, L = 10_000, 568
    tokens = random_tokens(vocab, B, L)
    tokens[torch.rand(B, L, generator=gen(5)) < 0.05] = 0  # real token id 0 must survive
    out = span_corruption(tokens, gen(1), vocab)
    inp, lab = out["input_ids"], out["labels"]
    assert inp.shape == (B, 512) and lab.shape == (B, 114)
    assert bool(out["padding_mask"].all()) and bool((lab != -100).all())
    assert bool((inp[:, -1] == vocab.eos_id).all()) and bool((lab[:, -1] == vocab.eos_id).all())

    first = vocab.first_sentinel_id
    expected = torch.arange(vocab.vocab_size - 1, vocab.vocab_size - 29, -1)
    in_sent = inp[inp >= first].view(B, -1)
    lab_sent = lab[lab >= first].view(B, -1)
    assert in_sent.shape == (B, 28) and lab_sent.shape == (B, 28)
    assert torch.equal(in_sent, expected.expand(B, 28))  # strictly decreasing from V-1
    assert torch.equal(lab_sent, expected.expand(B, 28))
    assert int(lab[:, 0].eq(vocab.vocab_size - 1).sum()) == B  # targets start with <extra_id_0>

    # 85 noise tokens in 28 spans: targets hold 85 non-sentinel tokens before EOS
    assert bool(((lab < first).sum(1) - 1 == 85).all())
    # token id 0 is never dropped: zeros in inputs + targets = zeros in the original
    assert torch.equal((inp == 0).sum(1) + (lab == 0).sum(1), (tokens == 0).sum(1))
    rows = reconstruct(inp[:300], lab[:300], vocab)
    assert rows == tokens[:300].tolist()


def test_noise_mask_counts_and_uniform_compositions():
    B, L = 10_000, 568
    mask = random_spans_noise_mask(L, 0.15, 3.0, gen(2), batch=B)
    assert mask.shape == (B, L) and mask.dtype == torch.bool
    assert bool((mask.sum(1) == 85).all())
    assert not bool(mask[:, 0].any()) and bool(mask[:, -1].all())  # starts non-noise, ends noise
    noise_runs, clean_runs = _runs(mask), _runs(~mask)
    assert noise_runs.shape == (B, 28) and bool((noise_runs > 0).all())
    assert clean_runs.shape == (B, 28) and bool((clean_runs > 0).all())

    # every composition of n into k positive parts equally likely: a part has length j with
    # probability C(n-j-1, k-2) / C(n-1, k-1)
    for runs, n in ((noise_runs, 85), (clean_runs, 483)):
        k = 28
        for j in (1, 2, 3, 5):
            p = math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
            freq = float((runs == j).double().mean())
            se = math.sqrt(p * (1 - p) / runs.numel())
            assert z_ok(freq, p, se), (n, j, freq, p)
    # positions: a middle token is noise with probability close to 85/568
    mid = float(mask[:, 100:468].double().mean())
    assert abs(mid - 85 / 568) < 0.004


def test_padded_rows_use_their_own_lengths(vocab):
    tokens = random_tokens(vocab, 6, 300, seed=3)
    lengths = [300, 271, 2, 50, 141, 3]
    for i, n in enumerate(lengths):
        tokens[i, n:] = vocab.pad_id
    out = span_corruption(tokens, gen(4), vocab)
    for i, n in enumerate(lengths):
        n_noise = min(max(round(0.15 * n), 1), n - 1)
        n_spans = max(1, round(n_noise / 3))
        assert int(out["padding_mask"][i].sum()) == n - n_noise + n_spans + 1
        assert int((out["labels"][i] != -100).sum()) == n_noise + n_spans + 1
    rows = reconstruct(out["input_ids"], out["labels"], vocab)
    assert rows == [tokens[i, :n].tolist() for i, n in enumerate(lengths)]


def test_deterministic(vocab):
    tokens = random_tokens(vocab, 8, 141)
    a = span_corruption(tokens, gen(7), vocab)
    b = span_corruption(tokens, gen(7), vocab)
    c = span_corruption(tokens, gen(8), vocab)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_density": 0.0}, "noise_density must be strictly between 0 and 1"),
    ({"noise_density": 1.0}, "noise_density"),
    ({"noise_density": -0.2}, "noise_density"),
    ({"mean_noise_span_length": 0.5}, "mean_noise_span_length must be a number >= 1"),
    ({"noise_density": 0.9, "mean_noise_span_length": 1.0}, "lower noise_density or raise mean_noise_span_length"),
])
def test_bad_parameters(vocab, kwargs, match):
    with pytest.raises(ValueError, match=match):
        span_corruption(random_tokens(vocab, 2, 20), gen(), vocab, **kwargs)


def test_bad_inputs(vocab):
    good = random_tokens(vocab, 2, 568)
    with pytest.raises(ValueError, match="vocabulary has 10"):
        span_corruption(good, gen(), NoiseVocab.synthetic(32_100, num_sentinels=10, first_special=1))
    short = good[:, :4].clone()
    short[0, 1:] = vocab.pad_id
    with pytest.raises(ValueError, match="at least 2 per row"):
        span_corruption(short, gen(), vocab)
    with_sentinel = good.clone()
    with_sentinel[1, 5] = vocab.vocab_size - 3
    with pytest.raises(ValueError, match="must not hold them"):
        span_corruption(with_sentinel, gen(), vocab)
    left_padded = good.clone()
    left_padded[0, 0] = vocab.pad_id
    with pytest.raises(ValueError, match="pad rows on the right"):
        span_corruption(left_padded, gen(), vocab)
    with pytest.raises(ValueError, match="int64"):
        span_corruption(good.float(), gen(), vocab)
    with pytest.raises(ValueError, match="2-D"):
        span_corruption(good[0], gen(), vocab)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        span_corruption(good + vocab.vocab_size, gen(), vocab)
    with pytest.raises(ValueError, match="torch.Generator"):
        span_corruption(good, 0, vocab)
    with pytest.raises(ValueError, match="inputs_length"):
        random_spans_helper(1, 0.15, 3.0)
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        random_spans_noise_mask(1, 0.15, 3.0, gen())
