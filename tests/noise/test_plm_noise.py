"""XLNet's PLM noise against its definition and against the per-example port of ``data_utils.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmkit.noise.plm import factorization_ranks, plm_goal, plm_noise, plm_targets, two_stream_masks


def _tokens(vocab, B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return vocab.regular_ids[torch.randint(vocab.regular_ids.numel(), (B, L), generator=g)]


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of True in each row."""
    out = []
    for row in mask:
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        out += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    return out


@pytest.mark.parametrize("L,k", [(512, 6.0), (128, 6.0), (64, 4.0), (33, 6.0), (7, 2.0)])
def test_every_row_predicts_exactly_round_L_over_K(vocab, L, k):
    targets = plm_targets(_tokens(vocab, 64, L), torch.Generator().manual_seed(1), vocab, k)
    assert plm_goal(512, 6.0) == 85  # XLNet: num_predict 85 of seq_len 512
    assert (targets.sum(1) == plm_goal(L, k)).all()


def test_special_tokens_are_never_targets_and_short_rows_take_what_they_have(vocab):
    tokens = _tokens(vocab, 32, 60)
    tokens[:, ::3] = vocab.eos_id
    targets = plm_targets(tokens, torch.Generator().manual_seed(2), vocab)
    assert not targets[tokens == vocab.eos_id].any()
    assert (targets.sum(1) == 10).all()
    few = _tokens(vocab, 4, 12)
    few[:, 1:] = vocab.pad_id  # one regular token per row, goal 2
    assert (plm_targets(few, torch.Generator().manual_seed(3), vocab) == (few != vocab.pad_id)).all()


def test_span_lengths_follow_the_reference_port(vocab, bench):
    """Run lengths of the targets: same distribution as XLNet's ``_sample_mask`` (token level)."""
    B, L = 400, 256
    tokens = _tokens(vocab, B, L)
    ours = plm_targets(tokens, torch.Generator().manual_seed(4), vocab).numpy()
    rng = np.random.default_rng(4)
    ref = np.stack([bench.ref_plm(tokens[i].numpy(), rng, vocab)["target_mask"] for i in range(B)])
    assert (ref.sum(1) == ours.sum(1)).all()
    a, b = np.bincount(_runs(ours), minlength=12)[1:12], np.bincount(_runs(ref), minlength=12)[1:12]
    pa, pb = a / a.sum(), b / b.sum()
    assert np.abs(pa - pb).max() < 0.03, (pa.round(3), pb.round(3))
    # n-grams longer than one token exist (spans, not only independent tokens)
    assert pa[1:5].sum() > 0.3
    # targets spread over the whole row: the first and last quarters each hold about a quarter
    quarter = ours.reshape(B, 4, L // 4).sum(2).sum(0) / ours.sum()
    assert np.abs(quarter - 0.25).max() < 0.05, quarter


def _brute_masks(ranks: list[int]):
    """From the factorization order: non-targets first (all see each other), targets in rank order."""
    L = len(ranks)
    query = np.zeros((L, L), dtype=bool)
    for i in range(L):
        for j in range(L):
            if ranks[j] < 0:
                query[i, j] = True  # context tokens are seen by everyone
            elif ranks[i] >= 0 and ranks[j] < ranks[i]:
                query[i, j] = True  # an earlier target in the order
    content = query | np.eye(L, dtype=bool)
    return content, query


def test_two_stream_masks_match_a_brute_force_construction_from_the_permutation(vocab, bench):
    tokens = _tokens(vocab, 16, 24)
    out = plm_noise(tokens, torch.Generator().manual_seed(5), vocab, k=3.0)
    content, query = two_stream_masks(out["perm_ranks"])
    for b in range(16):
        want_c, want_q = _brute_masks(out["perm_ranks"][b].tolist())
        assert (content[b].numpy() == want_c).all() and (query[b].numpy() == want_q).all()
    # and the reference's own formula (perm_mask: True = may NOT attend) on the same order
    ranks = out["perm_ranks"].numpy()
    tgt = ranks >= 0
    self_rank = np.where(tgt, ranks, ranks + 1)
    perm_mask = (self_rank[:, :, None] <= ranks[:, None, :]) & tgt[:, None, :]
    assert (query.numpy() == ~perm_mask).all()
    # a target's query never sees itself; its content stream does
    idx = torch.arange(24)
    assert not query[:, idx, idx][out["target_mask"]].any() and content[:, idx, idx].all()


def test_factorization_order_is_uniform_over_the_targets(vocab):
    targets = torch.zeros(20000, 6, dtype=torch.bool)
    targets[:, [1, 3, 4]] = True
    ranks = factorization_ranks(targets, torch.Generator().manual_seed(6))
    assert (ranks[:, [0, 2, 5]] == -1).all()
    assert (ranks[:, [1, 3, 4]].sort(1).values == torch.tensor([0, 1, 2])).all()
    first = (ranks[:, [1, 3, 4]] == 0).float().mean(0)
    assert torch.allclose(first, torch.full((3,), 1 / 3), atol=0.015), first


def test_same_generator_state_same_output(vocab):
    tokens = _tokens(vocab, 8, 64)
    a = plm_noise(tokens, torch.Generator().manual_seed(7), vocab)
    b = plm_noise(tokens, torch.Generator().manual_seed(7), vocab)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert torch.equal(a["input_ids"], tokens)  # no [MASK] in XLNet's inputs
    assert torch.equal(a["labels"][a["target_mask"]], tokens[a["target_mask"]])
    assert (a["labels"][~a["target_mask"]] == -100).all()
