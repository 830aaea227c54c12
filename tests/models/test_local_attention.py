"""``model.attention=alternating_local``: even layers dense, odd layers banded (position i sees i-W+1 .. i).

References: the band is written out position by position (:func:`_band`), and a banded layer must
equal dense SDPA under that mask (intersected with the model's own mask); each layer's receptive
field is read off its gradients; cached decoding must equal uncached; bad settings are one line.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.layers import build_attention_bias, document_attention_mask
from lmkit.models.llama import Llama, LlamaConfig, rope_cos_sin
from lmkit.models.local_attention import banded_attention
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit_test_utils import TINY, assert_compiled_matches_eager, one_error_line

TOK = ByteTokenizer()
V = TOK.vocab_size
ARCHS = {"gpt": (GPT, GPTConfig, {}), "llama": (Llama, LlamaConfig, {"n_kv_head": 1, "d_ff": 48})}


def _band(T: int, W: int) -> torch.Tensor:
    """The paper's band, one entry at a time: query i sees key j when i-W < j <= i."""
    return torch.tensor([[i - W < j <= i for j in range(T)] for i in range(T)])


def _reference(q, k, v, W, mask=None, dropout_p=0.0, scale=None):
    """Dense SDPA under (the model's mask, or causality) AND the band: what a banded layer must compute."""
    T = q.shape[2]
    base = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=base & _band(T, W), scale=scale)


def _model(arch: str, W: int = 3, n_layer: int = 4, **kw):
    cls, cfg_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = dict(n_layer=n_layer, n_head=2, d_model=32, max_seq_len=64, vocab_size=V, attention="alternating_local",
               attention_window=W, **extra)
    return cls(cfg_cls(**{**cfg, **kw})).eval()


def _masks(kind: str, B: int, T: int):
    """(padding_mask, attn_mask, document_ids) of a case, and the combined mask the layers receive."""
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, T - 3:] = False
    docs = torch.tensor([[0] * (T // 3) + [1] * (T - T // 3), [0] * (T // 2) + [2] * (T - T // 2)])
    prefix = torch.ones(B, T, T, dtype=torch.bool).tril()
    prefix[0, :, :T // 2] = True  # row 0: a bidirectional prefix of T/2 tokens
    prefix[1, :, :2] = True
    cases = {
        "none": (None, None, None),
        "padding": (padding, None, None),
        "documents": (None, None, docs),
        "padding+documents": (padding, None, docs),
        "prefix_lm": (padding, prefix, None),
    }
    pad, attn, doc = cases[kind]
    combined = attn if doc is None else document_attention_mask(doc, True, attn)
    mask, _ = build_attention_bias(pad, combined, True, T, T, "cpu")
    return (pad, attn, doc), mask


MASK_KINDS = ["none", "padding", "documents", "padding+documents", "prefix_lm"]


@pytest.mark.parametrize("T, W", [(16, 4), (13, 4), (9, 1), (8, 8), (7, 12), (29, 6)])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_blocked_banded_attention_equals_dense_band_reference(T, W, kind):
    g = torch.Generator().manual_seed(T * 100 + W)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _, mask = _masks(kind, 2, T)
    out = banded_attention(q, k, v, W, mask)
    ref = _reference(q, k, v, W, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cot)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _layer_input_jacobian_support(model, layer: int, T: int) -> torch.Tensor:
    """Bool [T, T]: output position i of layer ``layer``'s attention depends on its input at j."""
    attn = model.blocks[layer].attn
    x = torch.randn(1, T, model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(layer))
    if isinstance(model, Llama):
        cos, sin = rope_cos_sin(torch.arange(T)[None], model.head_dim, model.rope_theta)
        fn = lambda h: attn(h, cos, sin, is_causal=True)[0]  # noqa: E731
    else:
        fn = lambda h: attn(h, is_causal=True)[0]  # noqa: E731
    jac = torch.autograd.functional.jacobian(fn, x)  # [T, D, 1, T, D]
    return jac[:, :, 0].abs().sum(dim=(1, 3)) > 0


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_each_layer_sees_exactly_its_receptive_field(arch):
    T, W = 11, 3
    model = _model(arch, W=W).double()
    assert [b.attn.window for b in model.blocks] == [None, W, None, W]
    for layer in range(4):
        support = _layer_input_jacobian_support(model, layer, T)
        want = _band(T, W) if layer % 2 else torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.equal(support, want), (layer, support.int())


def _patch_reference(monkeypatch):
    """Every banded layer computes dense SDPA under the written-out band instead of the blocked kernel."""
    import lmkit.models.layers as layers
    import lmkit.models.llama as llama

    def reference(q, k, v, window, mask=None, dropout_p=0.0, scale=None):
        assert k.shape[2] == q.shape[2]
        return _reference(q, k, v, window, mask, dropout_p, scale)

    monkeypatch.setattr(layers, "banded_self_attention", reference)
    monkeypatch.setattr(llama, "banded_self_attention", reference)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_whole_model_equals_odd_layers_under_a_dense_band_mask(arch, kind, monkeypatch):
    T, W = 19, 4
    model = _model(arch, W=W).double()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    (pad, attn, doc), _ = _masks(kind, 2, T)

    def run():
        model.zero_grad(set_to_none=True)
        h = model(ids, padding_mask=pad, attn_mask=attn, document_ids=doc)
        h.pow(2).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = run()
    _patch_reference(monkeypatch)
    want, want_grads = run()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-9)
    dense = _model(arch, attention="dense", attention_window=None).double()
    assert not torch.allclose(dense(ids, padding_mask=pad, attn_mask=attn, document_ids=doc), got, atol=1e-4)


def _cached(model, ids, *chunks):
    """Hidden states of ``ids`` fed through the KV cache in chunks of the given lengths."""
    from lmkit.generation import kv_cache

    out, pos = [], 0
    with torch.no_grad(), kv_cache(model, ids.shape[0], ids.shape[1]):
        for n in chunks:
            feed = ids[:, pos:pos + n]
            out.append(model.forward_cached(feed, pos) if isinstance(model, Llama) else model(feed, input_pos=pos))
            pos += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_kv_cache_reads_the_band_and_equals_the_uncached_forward(arch):
    from lmkit.generation import GenerationOptions, generate_ids

    model = _model(arch, W=3)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
    # a prefill, chunks at later positions (the scorer's path) and single tokens (generation's)
    torch.testing.assert_close(_cached(model, ids, 7, 5, 1, 1, 8, 1, 1), full, rtol=1e-5, atol=1e-5)
    prompt = ids[0, :9].tolist()
    runs = []
    for use_cache in (True, False):
        logits = []
        new, _ = generate_ids(model, prompt, GenerationOptions(max_new_tokens=20, temperature=0, use_cache=use_cache),
                              logits_out=logits)
        runs.append((new, torch.stack(logits)))
    assert runs[0][0] == runs[1][0] and len(runs[0][0][0]) == 20
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-4)


def test_dense_default_marks_no_layer_banded():
    for arch in ("gpt", "llama"):
        model = _model(arch, attention="dense", attention_window=None)
        assert all(b.attn.window is None for b in model.blocks)
    assert GPTConfig().attention == "dense" and LlamaConfig().attention_window is None


@pytest.mark.parametrize("extra, expected", [
    (["model.attention=alternating_locl"], "Did you mean 'alternating_local'?"),
    (["model.attention=alternating_local"], "model.attention=alternating_local needs model.attention_window"),
    (["model.attention=alternating_local", "model.attention_window=0"], "model.attention_window must be >= 1, got 0"),
    (["model.attention_window=8"], "model.attention_window=8 has no effect with model.attention=dense"),
    (["model.attention=alternating_local", "model.attention_window=32"],
     "model.attention_window=32 is not shorter than data.seq_len=32"),
    (["model.attention=alternating_local", "model.attention_window=8", "model.n_layer=1"],
     "model.n_layer=1 has none: use model.n_layer=2 or more"),
    (["model=bert_tiny", "+objective=mlm", "model.attention=alternating_local"],
     "model.attention is not an option of architecture 'bert'; only gpt, llama have it"),
])
def test_bad_settings_are_one_line(extra, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error_line(capsys, [*TINY, "model.n_layer=2", *extra], expected)


def test_cli_training_lowers_the_loss_and_export_refuses(tmp_path):
    from lmkit.api import run
    from lmkit.interop import export, export_model

    summary = run(["+objective=causal_lm", *TINY, "model.n_layer=2", "model.attention=alternating_local",
                   "model.attention_window=16", "trainer.max_steps=30", "trainer.val_check_interval=30",
                   "optimizer.lr=3e-3"], tmp_path / "run")
    assert summary["steps"] == 30
    assert summary["end"]["val/loss"] < math.log(V) - 1.0
    with pytest.raises(ConfigError, match="cannot hold them") as err:
        export(tmp_path / "run", tmp_path / "hf")
    assert "\n" not in str(err.value) and "GPT2LMHeadModel" in str(err.value)
    with pytest.raises(ConfigError, match="LlamaForCausalLM attends densely in every layer, so it cannot hold"):
        export_model(_model("llama"), TOK, tmp_path / "hf_llama")


def test_compiled_model_gives_eager_loss_and_gradients(tmp_path):
    """``model.compile=true`` (one case, ~20 s: gpt with document masks, so the banded layers gather a mask)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "objectives"))
    from objective_helpers import RUN

    from lmkit.api import build

    built = build(["+objective=causal_lm", "objective.document_mask=true", "model=gpt_tiny", *RUN, "model.n_layer=2",
                   "model.attention=alternating_local", "model.attention_window=24", "model.compile=true"], tmp_path)
    assert built.module.model.blocks[1].attn.window == 24
    assert_compiled_matches_eager(built)
