"""Prefix LM, UniLM masks and the UL2 mixture of denoisers."""
from __future__ import annotations

import math

import pytest
import torch
from noise_helpers import gen, random_tokens, z_ok

from lmkit.noise import (
    UL2_DENOISERS, Denoiser, NoiseVocab, prefix_lm, prefix_lm_seq2seq, reconstruct, ul2_denoise, unilm_mask,
)


def brute_seq2seq(a, length):
    return torch.tensor([[j < a or j <= i for j in range(length)] for i in range(length)])


def test_unilm_masks():
    assert bool(unilm_mask("bidirectional", 5, batch=2).all())
    l2r = unilm_mask("left_to_right", 5, batch=2)
    assert torch.equal(l2r[1], torch.ones(5, 5, dtype=torch.bool).tril())
    s2s = unilm_mask("seq2seq", 6, segment_a_len=torch.tensor([0, 2, 6]))
    for b, a in enumerate([0, 2, 6]):
        assert torch.equal(s2s[b], brute_seq2seq(a, 6))
    assert not bool(s2s[1, 0, 2:].any())  # segment A never sees segment B
    padded = unilm_mask("bidirectional", 4, padding_mask=torch.tensor([[1, 1, 1, 0]]).bool())
    assert padded[0, :3, 3].tolist() == [False] * 3 and bool(padded[0, 3, 3])


def test_prefix_lm_split_mask_and_labels(vocab):
    B, N = 10_000, 9
    tokens = random_tokens(vocab, B, N)
    out = prefix_lm(tokens, gen(1), vocab)
    s = out["prefix_len"]
    assert out["input_ids"].shape == (B, N - 1) and out["attn_mask"].shape == (B, N - 1, N - 1)
    # split uniform in [1, n-1]
    assert int(s.min()) == 1 and int(s.max()) == N - 1
    for v in range(1, N):
        p = 1 / (N - 1)
        assert z_ok(float((s == v).double().mean()), p, math.sqrt(p * (1 - p) / B))
    for b in range(50):
        assert torch.equal(out["attn_mask"][b], brute_seq2seq(int(s[b]), N - 1))
        expected = [tokens[b, t + 1].item() if t + 1 >= s[b] else -100 for t in range(N - 1)]
        assert out["labels"][b].tolist() == expected
    # no label can be seen: position t predicting token t+1 attends no key > t
    t = torch.arange(N - 1)
    future = t[None, None, :] > t[None, :, None]
    labelled = (out["labels"] != -100)[:, :, None]
    assert not bool((out["attn_mask"] & future & labelled).any())


def test_prefix_lm_padding(vocab):
    tokens = random_tokens(vocab, 3, 10)
    tokens[1, 4:] = vocab.pad_id
    tokens[2, 2:] = vocab.pad_id
    out = prefix_lm(tokens, gen(2), vocab)
    assert out["padding_mask"].sum(1).tolist() == [9, 3, 1]
    assert 1 <= int(out["prefix_len"][1]) <= 3 and int(out["prefix_len"][2]) == 1
    assert bool((out["labels"][1, 3:] == -100).all()) and out["labels"][2].tolist()[0] == tokens[2, 1].item()
    seq = prefix_lm_seq2seq(tokens, gen(3), vocab)
    for b, n in enumerate([10, 4, 2]):
        s = int(seq["prefix_len"][b])
        inp = seq["input_ids"][b][seq["padding_mask"][b]].tolist()
        lab = [x for x in seq["labels"][b].tolist() if x != -100]
        assert inp == tokens[b, :s].tolist() + [vocab.eos_id]
        assert lab == tokens[b, s:n].tolist() + [vocab.eos_id]


def test_ul2_mode_tokens_and_mixture(vocab):
    B, L = 10_000, 141
    tokens = random_tokens(vocab, B, L)
    weights = [1, 1, 2, 1, 1, 1, 3]
    out = ul2_denoise(tokens, gen(4), vocab, weights=weights)
    d = out["denoiser"]
    mode = out["input_ids"][:, 0]
    expected_mode = torch.tensor([{"R": vocab.nlu_id, "X": vocab.nlg_id, "S": vocab.s2s_id}[x.kind] for x in UL2_DENOISERS])
    assert torch.equal(mode, expected_mode[d])
    for i, w in enumerate(weights):
        p = w / sum(weights)
        assert z_ok(float((d == i).double().mean()), p, math.sqrt(p * (1 - p) / B))
    # each row decodes back to the original; span rows have their denoiser's span count
    rows = torch.arange(B)[:400]
    inp, lab = out["input_ids"][rows, 1:], out["labels"][rows]
    for b in rows.tolist():
        den = UL2_DENOISERS[int(d[b])]
        i_row = inp[b][inp[b] != vocab.pad_id].tolist()
        l_row = [x for x in lab[b].tolist() if x != -100]
        if den.kind == "S":
            assert i_row[:-1] + l_row[:-1] == tokens[b].tolist()
        else:
            assert reconstruct(inp[b:b + 1], lab[b:b + 1], vocab)[0] == tokens[b].tolist()
            n_noise = min(max(round(den.density * L), 1), L - 1)
            n_spans = max(1, round(n_noise / den.mean_span))
            assert sum(x >= vocab.first_sentinel_id for x in i_row) == n_spans
    assert torch.equal(out["padding_mask"], out["input_ids"] != vocab.pad_id)


def test_ul2_per_batch(vocab):
    tokens = random_tokens(vocab, 64, 141)
    for seed in range(5):
        out = ul2_denoise(tokens, gen(seed), vocab, per_row=False)
        assert out["denoiser"].unique().numel() == 1
    only_r = ul2_denoise(tokens, gen(0), vocab, denoisers=[Denoiser("R", 3, 0.15)])
    assert bool((only_r["input_ids"][:, 0] == vocab.nlu_id).all())


def test_deterministic(vocab):
    tokens = random_tokens(vocab, 32, 141)
    a, b = ul2_denoise(tokens, gen(5), vocab), ul2_denoise(tokens, gen(5), vocab)
    c = ul2_denoise(tokens, gen(6), vocab)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["denoiser"], c["denoiser"]) or not torch.equal(a["input_ids"], c["input_ids"])
    p, q = prefix_lm(tokens, gen(5), vocab), prefix_lm(tokens, gen(5), vocab)
    assert all(torch.equal(p[k], q[k]) for k in p)
    assert not torch.equal(p["prefix_len"], prefix_lm(tokens, gen(6), vocab)["prefix_len"])


def test_bad_arguments(vocab):
    tokens = random_tokens(vocab, 4, 141)
    with pytest.raises(ValueError, match="weights must be 7 non-negative"):
        ul2_denoise(tokens, gen(), vocab, weights=[1, 2])
    with pytest.raises(ValueError, match="weights must be"):
        ul2_denoise(tokens, gen(), vocab, weights=[1, 1, 1, 1, 1, 1, -1])
    with pytest.raises(ValueError, match="kind must be 'R', 'X' or 'S'"):
        Denoiser("Q")
    no_modes = NoiseVocab(**{**vocab.__dict__, "nlg_id": None})
    with pytest.raises(ValueError, match="needs the mode token nlg_id"):
        ul2_denoise(tokens, gen(), no_modes)
    with pytest.raises(ValueError, match="needs 171 sentinel ids"):
        ul2_denoise(random_tokens(vocab, 4, 1024), gen(), vocab, denoisers=[Denoiser("X", 3, 0.5)])
    with pytest.raises(ValueError, match="kind must be one of"):
        unilm_mask("causal", 4)
    with pytest.raises(ValueError, match="needs segment_a_len"):
        unilm_mask("seq2seq", 4)
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        prefix_lm(tokens[:, :2], gen(), vocab)
    short = tokens[:, :5].clone()
    short[0, 1:] = vocab.pad_id
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        prefix_lm_seq2seq(short, gen(), vocab)
