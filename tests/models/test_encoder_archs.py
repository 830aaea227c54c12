"""Encoder (BERT, ALBERT) and encoder–decoder (T5, BART) architectures against the contract
in lmkit/models/base.py. Tiny sizes: the whole file runs in a few seconds on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmkit.models.albert import ALBERT, ALBERTConfig
from lmkit.models.bart import BART, BARTConfig
from lmkit.models.bert import BERT, BERTConfig
from lmkit.models.layers import MLP, GatedMLP
from lmkit.models.t5 import T5, T5Config, relative_position_bucket

V, D, H, L, FF, MAXLEN = 40, 32, 4, 2, 64, 32

BUILDERS = {
    "bert": lambda **kw: BERT(BERTConfig(**{**dict(n_layer=L, n_head=H, d_model=D, d_ff=FF, max_seq_len=MAXLEN,
                                                   vocab_size=V), **kw})),
    "bert_preln": lambda **kw: BERT(BERTConfig(**{**dict(n_layer=L, n_head=H, d_model=D, d_ff=FF,
                                                         max_seq_len=MAXLEN, vocab_size=V, pre_ln=True), **kw})),
    "albert": lambda **kw: ALBERT(ALBERTConfig(**{**dict(n_layer=3, n_head=H, d_model=D, d_ff=FF, embedding_size=16,
                                                         max_seq_len=MAXLEN, vocab_size=V), **kw})),
    "albert_none": lambda **kw: ALBERT(ALBERTConfig(**{**dict(n_layer=3, n_head=H, d_model=D, d_ff=FF,
                                                              embedding_size=16, max_seq_len=MAXLEN, vocab_size=V,
                                                              share="none"), **kw})),
    "t5": lambda **kw: T5(T5Config(**{**dict(n_layer=L, n_head=H, d_model=D, d_ff=FF, max_seq_len=MAXLEN,
                                             vocab_size=V), **kw})),
    "t5_gated_untied": lambda **kw: T5(T5Config(**{**dict(n_layer=L, n_decoder_layer=1, n_head=H, d_model=D, d_ff=FF,
                                                          max_seq_len=MAXLEN, vocab_size=V, ffn="gated-gelu",
                                                          tie_embeddings=False), **kw})),
    "bart": lambda **kw: BART(BARTConfig(**{**dict(n_layer=L, n_head=H, d_model=D, d_ff=FF, max_seq_len=MAXLEN,
                                                   vocab_size=V), **kw})),
}
ENCODERS = ["bert", "bert_preln", "albert", "albert_none"]
ENC_DEC = ["t5", "t5_gated_untied", "bart"]
ALL = ENCODERS + ENC_DEC


def build(name, **kw):
    torch.manual_seed(0)
    return BUILDERS[name](**kw)


def run(model, ids, pad=None, dec=None, dec_pad=None, **kw):
    if model.kind == "encoder_decoder":
        if dec is None:
            dec = ids
        return model(ids, padding_mask=pad, decoder_input_ids=dec, decoder_padding_mask=dec_pad, **kw)
    return model(ids, padding_mask=pad, **kw)


def ids(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("name", ALL)
def test_contract_and_shapes(name):
    model = build(name)
    assert model.kind == ("encoder_decoder" if name in ENC_DEC else "encoder")
    assert (model.d_model, model.vocab_size, model.max_seq_len) == (D, V, MAXLEN)
    x = ids(2, 10)
    dec = ids(2, 7, seed=2)
    h = run(model, x, dec=dec)
    T_out = 7 if name in ENC_DEC else 10
    assert h.shape == (2, T_out, D)
    assert model.logits(h).shape == (2, T_out, V)
    emb = model.output_embedding()
    if name.startswith("albert"):
        assert emb.shape == (V, model.embedding_size) == (V, 16)
    else:
        assert emb.shape == (V, D)
    if model.kind == "encoder":
        assert model.pooled(h).shape == (2, D)
    blocks = model.transformer_blocks()
    n_expected = {"albert": 3, "albert_none": 3, "t5_gated_untied": 3}.get(name, 2 * L if name in ENC_DEC else L)
    assert len(blocks) == n_expected
    for b in blocks:
        assert isinstance(b.attn, nn.Module) and isinstance(b.mlp, nn.Module)
    assert model.embedding_modules() and all(isinstance(m, nn.Embedding) for m in model.embedding_modules())


def test_logits_match_output_embedding():
    h = torch.randn(2, 5, D)
    t5 = build("t5")
    torch.testing.assert_close(t5.logits(h), (h * D ** -0.5) @ t5.output_embedding().t())
    assert t5.output_embedding() is t5.shared.weight
    untied = build("t5_gated_untied")
    torch.testing.assert_close(untied.logits(h), h @ untied.output_embedding().t())
    bart = build("bart")
    torch.testing.assert_close(bart.logits(h), h @ bart.output_embedding().t())
    bert = build("bert", head_transform=False)
    torch.testing.assert_close(bert.logits(h), h @ bert.output_embedding().t() + bert.lm_bias)
    albert = build("albert")
    torch.testing.assert_close(albert.logits(h), albert.project_to_embedding(h) @ albert.output_embedding().t()
                               + albert.lm_bias)


@pytest.mark.parametrize("name", ALL)
def test_padding_invariance(name):
    model = build(name).eval()
    x = ids(2, 8)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, 5:] = False  # row 1 is 5 tokens long
    dec = ids(2, 6, seed=2)
    dec_pad = torch.ones(2, 6, dtype=torch.bool)
    dec_pad[1, 4:] = False
    P = 3
    x_long = torch.cat([x, ids(2, P, seed=3)], 1)  # arbitrary ids in the padding
    pad_long = torch.cat([pad, torch.zeros(2, P, dtype=torch.bool)], 1)
    dec_long = torch.cat([dec, ids(2, P, seed=4)], 1)
    dec_pad_long = torch.cat([dec_pad, torch.zeros(2, P, dtype=torch.bool)], 1)
    with torch.no_grad():
        short = run(model, x, pad, dec, dec_pad)
        long = run(model, x_long, pad_long, dec_long, dec_pad_long)
    assert torch.isfinite(long).all() and torch.isfinite(short).all()  # padded queries give no NaN
    real = dec_pad if name in ENC_DEC else pad
    torch.testing.assert_close(long[:, : real.shape[1]][real], short[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_fully_padded_batch_row_is_finite(name):
    model = build(name).eval()
    x = ids(2, 6)
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1] = False
    with torch.no_grad():
        h = run(model, x, pad, x, pad)
    assert torch.isfinite(h).all()


def _changed(model, x, pos, **kw):
    """Per-position max abs change of the output when token ``pos`` is changed."""
    y = x.clone()
    y[:, pos] = (y[:, pos] + 1) % V
    with torch.no_grad():
        return (model(x, **kw) - model(y, **kw)).abs().amax(dim=(0, 2))


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_is_bidirectional_and_attn_mask_overrides(name):
    model = build(name).eval()
    x = ids(1, 8)
    diff = _changed(model, x, 7)
    assert (diff > 1e-6).all()  # a later token changes every earlier position
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None]
    diff = _changed(model, x, 5, attn_mask=causal)  # UniLM-style left-to-right mask
    assert (diff[:5] == 0).all() and (diff[5:] > 1e-6).all()


@pytest.mark.parametrize("name", ENC_DEC)
def test_encoder_decoder_directionality(name):
    model = build(name).eval()
    x, dec = ids(1, 8), ids(1, 6, seed=2)
    # Encoder: bidirectional (position 0 of the encoder output sees the last token).
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    with torch.no_grad():
        assert (model.encode(x) - model.encode(y))[:, 0].abs().max() > 1e-6
        # Every decoder position sees the whole encoder through cross-attention.
        assert ((model(x, decoder_input_ids=dec) - model(y, decoder_input_ids=dec)).abs().amax(-1) > 1e-6).all()
        # Decoder: causal.
        dec2 = dec.clone()
        dec2[:, 3] = (dec2[:, 3] + 1) % V
        diff = (model(x, decoder_input_ids=dec) - model(x, decoder_input_ids=dec2)).abs().amax(dim=(0, 2))
    assert (diff[:3] == 0).all() and (diff[3:] > 1e-6).all()


@pytest.mark.parametrize("name", ENC_DEC)
def test_forward_equals_decode_of_encode(name):
    model = build(name).eval()
    x, dec = ids(2, 8), ids(2, 5, seed=2)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, 6:] = False
    with torch.no_grad():
        a = model(x, padding_mask=pad, decoder_input_ids=dec)
        b = model.decode(dec, model.encode(x, pad), encoder_padding_mask=pad)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(x)


def test_t5_relative_position_bucket_reference_values():
    # Hand-computed from the reference T5 formula (HF T5Attention._relative_position_bucket):
    # bidirectional, 32 buckets -> 16 per direction, max_exact = 8; bucket for |r| >= 8 is
    # 8 + floor(log(|r|/8) / log(128/8) * 8), capped at 15; keys after the query (r > 0) add 16.
    rel = torch.tensor([0, -1, -3, 3, -7, -8, 7, 8, -16, 16, -20, -100, -127, -128, -1000, 1000])
    expected = [0, 1, 3, 19, 7, 8, 23, 24, 10, 26, 10, 15, 15, 15, 15, 31]
    assert relative_position_bucket(rel, bidirectional=True).tolist() == expected
    # causal: r > 0 -> 0; n = -r; max_exact = 16; bucket = 16 + floor(log(n/16) / log(8) * 16), capped at 31.
    rel = torch.tensor([0, 5, 1000, -5, -15, -16, -20, -32, -64, -100, -127, -128, -500])
    expected = [0, 0, 0, 5, 15, 16, 17, 21, 26, 30, 31, 31, 31]
    assert relative_position_bucket(rel, bidirectional=False).tolist() == expected
    # num_buckets=8, max_distance=20, bidirectional: 4 per side, max_exact 2,
    # bucket = 2 + floor(log(n/2) / log(10) * 2), capped at 3.
    rel = torch.tensor([-1, -2, -5, -9, -20, 9])
    assert relative_position_bucket(rel, True, num_buckets=8, max_distance=20).tolist() == [1, 2, 2, 3, 3, 7]


def test_t5_relative_bias_shared_across_layers():
    model = build("t5").eval()
    tables = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert len(tables) == 2  # one per stack (encoder, decoder), used by all of its layers
    assert model.encoder.relative_attention_bias.relative_attention_bias.weight.shape == (32, H)
    x, dec = ids(1, 8), ids(1, 6, seed=2)
    with torch.no_grad():
        before = model(x, decoder_input_ids=dec)
        model.decoder.relative_attention_bias.relative_attention_bias.weight.add_(1.0 * torch.randn(32, H))
        after = model(x, decoder_input_ids=dec)
    assert (before - after).abs().max() > 1e-4
    # No absolute positions, no biases in linears.
    assert not any(isinstance(m, nn.Linear) and m.bias is not None for m in model.modules())


def _block_counts():
    """Parameters of one ALBERT attention, FFN and whole block (attention + FFN + 2 LayerNorms)."""
    attn = (D * 3 * D + 3 * D) + (D * D + D)  # qkv + output projection, with biases
    mlp = (D * FF + FF) + (FF * D + D)
    norms = 2 * (2 * D)
    return attn, mlp, attn + mlp + norms


@pytest.mark.parametrize("share", ["all", "attention", "ffn"])
def test_albert_sharing_reduces_parameters(share):
    n_layer = 3
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (parameters() deduplicates)
    base = count(build("albert", share="none"))
    shared = build("albert", share=share)
    attn, mlp, block = _block_counts()
    saved = {"all": block, "attention": attn, "ffn": mlp}[share] * (n_layer - 1)
    assert base - count(shared) == saved
    blocks = shared.transformer_blocks()
    assert len(blocks) == n_layer
    assert (blocks[0].attn is blocks[2].attn) == (share in ("all", "attention"))
    assert (blocks[0].mlp is blocks[2].mlp) == (share in ("all", "ffn"))


def test_albert_factorized_embedding_sizes():
    model = build("albert")
    assert model.wte.weight.shape == (V, 16) and model.embedding_hidden_mapping_in.weight.shape == (D, 16)


def test_bert_token_types_matter():
    model = build("bert").eval()
    x = ids(1, 6)
    tt = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert (model(x) - model(x, token_type_ids=tt)).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["bert", "albert", "bart"])
def test_too_long_raises(name):
    with pytest.raises(ValueError, match="max_seq_len"):
        run(build(name), ids(1, MAXLEN + 1))


@pytest.mark.parametrize("cls,cfg", [(BERT, BERTConfig), (ALBERT, ALBERTConfig), (T5, T5Config), (BART, BARTConfig)])
def test_vocab_size_required(cls, cfg):
    with pytest.raises(ValueError, match="vocab_size"):
        cls(cfg(n_layer=1, d_model=D, n_head=H))


def _loss(model, x, dec, target):
    h = run(model, x, dec=dec)
    loss = F.cross_entropy(model.logits(h).flatten(0, 1), target.flatten())
    if model.kind == "encoder":
        loss = loss + model.pooled(h).pow(2).mean()
    return loss


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    model = build(name)
    x = ids(2, 8)
    dec = ids(2, 6, seed=2)
    target = ids(2, 6 if name in ENC_DEC else 8, seed=3)
    _loss(model, x, dec, target).backward()
    if model.kind == "encoder" and getattr(model, "wtte", None) is not None:
        # token type 1 only gets a gradient when used
        h = model(x, token_type_ids=torch.ones_like(x))
        model.logits(h).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


@pytest.mark.parametrize("name", ALL)
def test_overfits_a_fixed_batch(name):
    model = build(name)
    torch.manual_seed(0)
    x = ids(4, 12)
    dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), ids(4, 11, seed=5)], 1)
    target = ids(4, 12, seed=5) if name in ENCODERS else torch.cat([dec[:, 1:], ids(4, 1, seed=6)], 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        h = run(model, x, dec=dec)
        loss = F.cross_entropy(model.logits(h).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


class HalfScale(nn.Module):
    def forward(self, x):
        return 0.5 * x


@pytest.mark.parametrize("name", ALL + ["albert_attention"])
def test_mlp_is_swappable(name):
    model = build("albert", share="attention") if name == "albert_attention" else build(name)
    model.eval()
    x = ids(2, 8)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, 6:] = False
    with torch.no_grad():
        before = run(model, x, pad, x, pad)
        for block in model.transformer_blocks():
            block.mlp = HalfScale()
        after = run(model, x, pad, x, pad)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-4
    assert not any(isinstance(m, (MLP, GatedMLP)) for m in model.modules())  # no old FFN left behind
