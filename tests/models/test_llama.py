"""The ``llama`` architecture: causal, grouped-query attention equal to repeated K/V, rotary positions
relative, config checks in one line, and training with the decoder objectives, document masks,
``model.compile`` and chunked cross-entropy."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError
from lmkit.models.layers import document_ids_from_separators
from lmkit.models.llama import Llama, LlamaConfig, apply_rope, llama_ffn_size, rope_cos_sin
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit_test_utils import TINY, assert_compiled_matches_eager

TOK = ByteTokenizer()
V = TOK.vocab_size
# TINY's sizes for the llama preset: 2 query heads share 1 key/value head
LLAMA_TINY = ["model=llama_tiny", *TINY, "model.n_kv_head=1", "model.d_ff=64"]


def _model(**kw) -> Llama:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_seq_len=64, vocab_size=V)
    return Llama(LlamaConfig(**{**cfg, **kw})).eval()


def _ids(B=2, T=20, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_future_tokens_do_not_change_past_logits():
    model = _model()
    ids = _ids()
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 256
    with torch.no_grad():
        a, b = model.logits(model(ids)), model.logits(model(changed))
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_padding_mask_leaves_real_positions_unchanged():
    model = _model()
    ids = _ids()
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1, 15:] = False
    with torch.no_grad():
        padded = model(ids, padding_mask=pad)
        alone = model(ids[1:, :15])
    torch.testing.assert_close(padded[1, :15], alone[0], rtol=1e-5, atol=1e-5)


def _reference_attention(attn, x, cos, sin):
    """The attention written out: every query head gets its group's key/value head, explicit softmax."""
    B, T, _ = x.shape
    hd, H, KV = attn.head_dim, attn.n_head, attn.n_kv_head
    q = apply_rope(attn.q(x).view(B, T, H, hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k(x).view(B, T, KV, hd).transpose(1, 2), cos, sin)
    v = attn.v(x).view(B, T, KV, hd).transpose(1, 2)
    heads = []
    for h in range(H):
        g = h // (H // KV)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, g])
    return attn.proj(torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_attention_equals_repeated_kv_reference(n_kv_head):
    model = _model(n_kv_head=n_kv_head)
    attn = model.blocks[0].attn
    assert attn.k.out_features == n_kv_head * 8 and attn.q.out_features == 32
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(torch.arange(16)[None], 8, 10000.0)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), _reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([[m]]), hd, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    for m, n in [(5, 2), (40, 37), (103, 100)]:
        assert score(m, n) == pytest.approx(score(3, 0), rel=1e-4, abs=1e-5)
    assert abs(score(7, 0) - score(3, 0)) > 1e-3
    # a rotation keeps the norm; position 0 is the identity; the half-split layout pairs j with j + hd/2
    cos, sin = rope_cos_sin(torch.tensor([[0, 9]]), hd, 10000.0)
    rotated = apply_rope(q.expand(1, 1, 2, hd), cos, sin)
    torch.testing.assert_close(rotated[0, 0, 0], q[0, 0, 0])
    torch.testing.assert_close(rotated[0, 0, 1].norm(), q.norm())
    angle = 9.0  # frequency 1 for pair 0
    expected0 = q[0, 0, 0, 0] * math.cos(angle) - q[0, 0, 0, hd // 2] * math.sin(angle)
    assert rotated[0, 0, 1, 0].item() == pytest.approx(expected0.item(), abs=1e-5)


def test_sizes_derive_as_llama_does_and_bad_configs_are_refused_in_one_line():
    assert llama_ffn_size(4096) == 11008 and llama_ffn_size(2048, 1024, 1.5) == 8192
    cfg = LlamaConfig(d_model=128, vocab_size=V)
    assert cfg.ffn_size == 512 and cfg.kv_heads == cfg.n_head
    model = Llama(LlamaConfig(n_layer=1, d_model=32, n_head=2, vocab_size=V, tie_embeddings=True))
    assert model.lm_head is None and model.output_embedding() is model.wte.weight
    assert not any(n.endswith("bias") for n, _ in _model().named_parameters())
    for kw, expected in [({"n_head": 4, "n_kv_head": 3}, "not divisible by model.n_kv_head=3"),
                         ({"d_model": 30, "n_head": 4}, "d_model=30 is not divisible by model.n_head=4"),
                         ({"d_model": 12, "n_head": 4}, "is odd"),
                         ({"rope_theta": 0.0}, "model.rope_theta"),
                         ({"rms_norm_eps": -1.0}, "model.rms_norm_eps")]:
        with pytest.raises(ConfigError, match=expected) as e:
            LlamaConfig(**kw)
        assert "\n" not in str(e.value)


def test_presets_build():
    import yaml

    from lmkit.conf_path import core_conf_dir

    counts = {}
    for name in ("llama_tiny", "llama_small", "llama_1b"):
        fields = yaml.safe_load((Path(core_conf_dir()) / "model" / f"{name}.yaml").read_text())
        fields["vocab_size"] = 128256 if name == "llama_1b" else V
        with torch.device("meta"):
            model = Llama(LlamaConfig(**fields))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts["llama_tiny"] < counts["llama_small"]
    assert abs(counts["llama_1b"] - 1_235_814_400) < 1e6  # Llama 3.2 1B: 1.24B with its tied head


def test_packed_document_equals_document_alone():
    model = _model()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (5, 9, 4)]
    eos = torch.tensor([TOK.eos_id])
    packed = torch.cat([docs[0], eos, docs[1], eos, docs[2]])[None]
    doc_ids = document_ids_from_separators(packed, TOK.eos_id)
    with torch.no_grad():
        masked, unmasked = model(packed, document_ids=doc_ids), model(packed)
        for i, doc in enumerate(docs):
            alone = model((doc if i == 2 else torch.cat([doc, eos]))[None])
            span = doc_ids[0] == i
            torch.testing.assert_close(masked[0, span], alone[0], atol=1e-5, rtol=1e-5)
            if i > 0:  # rotary positions restart at each document
                assert (unmasked[0, span] - alone[0]).abs().max() > 1e-3


def test_chunked_ce_equals_the_plain_loss_and_gradients():
    from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig

    blocks = torch.randint(0, 256, (4, 49), generator=torch.Generator().manual_seed(1))
    results = []
    for tie in (False, True):
        for chunk in (0, 40):
            model = _model(tie_embeddings=tie).train()
            objective = CausalLM(CausalLMConfig(chunked_ce=chunk), TOK)
            out = objective.loss(model, objective.make_collator()(blocks, torch.Generator()))
            out.loss_sum.backward()
            results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    for (plain, plain_grads), (fused, fused_grads) in (results[:2], results[2:]):
        torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
        assert fused.n_targets == plain.n_targets
        for name, grad in plain_grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # and the plain loss is what cross-entropy of model.logits gives
    model = _model()
    batch = CausalLM(CausalLMConfig(), TOK).make_collator()(blocks, torch.Generator())
    out = CausalLM(CausalLMConfig(), TOK).loss(model, batch)
    with torch.no_grad():
        logits = model.logits(model(blocks[:, :-1]))
    expected = F.cross_entropy(logits.reshape(-1, V), blocks[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("objective, extra", [
    ("causal_lm", []),
    ("causal_lm", ["objective.document_mask=true"]),
    ("prefix_lm", []),
    ("causal_lm", ["objective.chunked_ce=16"]),
])
def test_trains_through_the_cli(objective, extra, tmp_path, monkeypatch, capsys):
    from lmkit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([f"+objective={objective}", *LLAMA_TINY, *extra]) == 0, capsys.readouterr().err[-2000:]
    ckpts = list((tmp_path / "outputs").rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert "model.blocks.0.attn.k.weight" in state and state["model.blocks.0.attn.k.weight"].shape == (16, 32)


def test_loss_falls(tmp_path):
    from lmkit.api import run

    summary = run(["+objective=causal_lm", *LLAMA_TINY, "trainer.max_steps=30", "trainer.val_check_interval=30",
                   "optimizer.lr=3e-3"], tmp_path)
    assert summary["steps"] == 30
    assert summary["end"]["val/loss"] < math.log(V) - 1.0


@pytest.mark.parametrize("objective, extra", [("causal_lm", []), ("prefix_lm", []),
                                              ("causal_lm", ["objective.document_mask=true"])])
def test_compiled_model_gives_eager_loss_and_gradients(objective, extra, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "objectives"))
    from objective_helpers import RUN

    from lmkit.api import build

    built = build([f"+objective={objective}", "model=llama_tiny", *RUN, "model.n_kv_head=1", "model.d_ff=96",
                   "model.compile=true", *extra], tmp_path)
    assert_compiled_matches_eager(built)


def test_cached_decoding_equals_the_full_forward():
    """forward_cached with a KV cache of n_kv_head heads per layer: prefill, then one token at a time."""
    from lmkit.models.layers import KVCache

    model = _model(n_kv_head=2)
    ids = _ids(B=2, T=24)
    for block in model.blocks:
        block.attn.kv_cache = KVCache(2, 2, 32, model.head_dim)
    with torch.no_grad():
        full = model.logits(model(ids))
        steps = [model.logits(model.forward_cached(ids[:, :10], 0))]
        steps += [model.logits(model.forward_cached(ids[:, t:t + 1], t)) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.kv_cache.k.shape == (2, 2, 32, 8)  # GQA: the cache holds the kv heads only
    for block in model.blocks:
        block.attn.kv_cache = None
    with pytest.raises(ValueError, match="kv_cache"):
        model.forward_cached(ids[:, :1], 0)
