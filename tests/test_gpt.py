"""GPT decoder: causality, tying, initialization and preset sizes."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from lmkit_test_utils import REPO
from lmkit.models.gpt import GPT, GPTConfig


def tiny(**kw):
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 16, "vocab_size": 50, **kw}))


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    h1, h2 = m(x), m(y)
    assert torch.allclose(h1[0, :8], h2[0, :8], atol=1e-6)
    assert not torch.allclose(h1[0, 8:], h2[0, 8:])


def test_prefix_lm_mask_makes_prefix_bidirectional():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randint(0, 50, (1, 10))
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    mask[:, :4] = True  # every position sees the 4-token prefix
    y = x.clone()
    y[0, 3] = (y[0, 3] + 1) % 50
    assert not torch.allclose(m(x, attn_mask=mask[None])[0, 0], m(y, attn_mask=mask[None])[0, 0])
    assert torch.allclose(m(x)[0, 0], m(y)[0, 0])  # causal: position 0 ignores position 3


def test_tied_embeddings_share_storage_and_logits_match():
    m = tiny()
    assert m.output_embedding() is m.wte.weight
    h = torch.randn(2, 3, 32)
    assert torch.allclose(m.logits(h), h @ m.wte.weight.t())
    untied = tiny(tie_embeddings=False)
    assert untied.output_embedding() is not untied.wte.weight


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=8, n_head=4, d_model=256, vocab_size=1000, max_seq_len=64))
    expected = 0.02 / math.sqrt(2 * 8)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in m.blocks] + [b.mlp.proj.weight.flatten() for b in m.blocks])
    fc = torch.cat([b.mlp.fc.weight.flatten() for b in m.blocks])
    assert proj.std().item() == pytest.approx(expected, rel=0.03)
    assert fc.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert all((b.mlp.fc.bias == 0).all() for b in m.blocks)


def test_xavier_init_option():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, d_model=256, vocab_size=1000, init="xavier"))
    w = m.blocks[0].mlp.fc.weight  # 1024 x 256
    bound = math.sqrt(6 / (256 + 1024))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


@pytest.mark.parametrize("preset, millions", [("gpt2_124m", 124.4), ("gpt2_350m", 354.8)])
def test_gpt2_presets_have_the_papers_sizes(preset, millions):
    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{preset}.yaml").read_text())
    cfg["vocab_size"] = 50257
    with torch.device("meta"):
        m = GPT(GPTConfig(**cfg))
    n = sum(p.numel() for p in m.parameters())
    assert n / 1e6 == pytest.approx(millions, rel=0.01)


def test_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))
