"""Relative attention (Transformer-XL eq. 3, XLNet's relative segments) against a per-pair computation."""
from __future__ import annotations

import math

import torch

from lmkit.models.relative_attention import RelativeAttention, relative_layout, sinusoid_embedding


def _brute(att: RelativeAttention, x, context, q_pos, k_pos, d_model, mask=None, seg_diff=None):
    """Score of every (i, j) pair written out as in the paper, then softmax and values."""
    B, Tq, _ = x.shape
    H, dh = att.n_head, att.d_head
    q = att.q(x).view(B, Tq, H, dh)
    k, v = (t.view(B, -1, H, dh) for t in att.kv(context).chunk(2, dim=-1))
    out = torch.zeros(B, Tq, H, dh)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                scores = []
                for j in range(context.shape[1]):
                    rel = sinusoid_embedding(torch.tensor([q_pos[i] - k_pos[j]]), d_model)[0]
                    r = att.r(rel).view(H, dh)[h]
                    s = (q[b, i, h] + att.u[h]) @ k[b, j, h] + (q[b, i, h] + att.v[h]) @ r
                    if seg_diff is not None:
                        s = s + (q[b, i, h] + att.s[h]) @ att.seg_embed[int(seg_diff[b, i, j]), h]
                    ok = True if mask is None else bool(mask[b, 0, i, j])
                    scores.append(s / math.sqrt(dh) if ok else torch.tensor(float("-inf")))
                scores = torch.stack(scores)
                if torch.isinf(scores).all():
                    continue
                out[b, i, h] = torch.softmax(scores, 0) @ v[b, :, h]
    return att.o(out.reshape(B, Tq, H * dh))


def _random_module(segments=False, seed=0):
    torch.manual_seed(seed)
    att = RelativeAttention(16, 2, segments=segments)
    with torch.no_grad():
        for p in (att.u, att.v) + ((att.s, att.seg_embed) if segments else ()):
            p.normal_()
    return att


def test_causal_attention_over_memory_matches_the_per_pair_scores():
    att = _random_module()
    B, M, T, D = 2, 3, 4, 16
    mem, seg = torch.randn(B, M, D), torch.randn(B, T, D)
    context = torch.cat([mem, seg], 1)
    q_pos, k_pos = torch.arange(M, M + T), torch.arange(M + T)
    distances, index = relative_layout(q_pos, k_pos)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(B, 1, T, M + T)
    k, v = att.keys_values(context)
    got = att.attend(seg, k, v, att.position_keys(sinusoid_embedding(distances, D)), index, mask)
    want = _brute(att, seg, context, q_pos.tolist(), k_pos.tolist(), D, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bidirectional_attention_with_segments_and_an_empty_row():
    att = _random_module(segments=True, seed=1)
    B, T, D = 2, 5, 16
    x = torch.randn(B, T, D)
    pos = torch.arange(T)
    distances, index = relative_layout(pos, pos)
    mask = torch.rand(B, 1, T, T) > 0.4
    mask[0, 0, 2] = False  # a query that sees nothing: zero output, no NaN
    seg_ids = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    seg_diff = seg_ids[:, :, None] != seg_ids[:, None, :]
    k, v = att.keys_values(x)
    got = att.attend(x, k, v, att.position_keys(sinusoid_embedding(distances, D)), index, mask, seg_diff)
    want = _brute(att, x, x, pos.tolist(), pos.tolist(), D, mask, seg_diff)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert got[0, 2].abs().max() == 0
    assert torch.isfinite(got).all()


def test_a_query_that_sees_nothing_passes_no_gradient_to_the_keys():
    att = _random_module()
    x = torch.randn(1, 3, 16, requires_grad=True)
    pos = torch.arange(3)
    distances, index = relative_layout(pos, pos)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    k, v = att.keys_values(x)
    att.attend(x, k, v, att.position_keys(sinusoid_embedding(distances, 16)), index, mask).sum().backward()
    assert x.grad.abs().max() == 0
