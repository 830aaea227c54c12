"""apply_moe on the built-in llama: its SwiGLU MLP becomes gated (SwiGLU) experts.

A one-expert layer holding the dense weights computes the dense MLP exactly; gated experts equal a
written-out reference under both dispatches; a switch llama trains through the CLI path.
"""
import pytest
import torch
import torch.nn.functional as F

from lmkit.models.layers import GatedMLP
from lmkit.models.llama import Llama, LlamaConfig
from lmkit_moe import MoELayer, apply_moe, moe_layers
from moe_helpers import seeded  # noqa: F401


def llama(n_layer=2, **kw):
    return Llama(LlamaConfig(vocab_size=37, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=16, d_ff=24,
                             max_seq_len=32, **kw))


def test_swiglu_mlp_becomes_gated_experts():
    model = apply_moe(llama(), {"num_experts": 4, "every": 2})
    assert [type(b.mlp) for b in model.transformer_blocks()] == [GatedMLP, MoELayer]
    ex = model.blocks[1].mlp.experts
    assert ex.gated and ex.gate_weight.shape == (4, 24, 16) and ex.fc_weight.shape == (4, 24, 16)
    assert ex.fc_bias is None and ex.gate_bias is None and ex.proj_bias is None  # llama has no biases
    assert isinstance(ex.act, torch.nn.SiLU)
    assert [n for n, _ in moe_layers(model)] == ["blocks.1.mlp"]
    # a GPT's plain MLP still gives plain experts
    from lmkit.models.gpt import GPT, GPTConfig

    gpt = apply_moe(GPT(GPTConfig(vocab_size=37, n_layer=2, n_head=2, d_model=16, max_seq_len=32)), {"num_experts": 2})
    assert not gpt.blocks[1].mlp.experts.gated and gpt.blocks[1].mlp.experts.gate_weight is None


@pytest.mark.parametrize("dispatch", ["bmm", "grouped_mm"])
def test_one_expert_with_the_dense_weights_is_the_dense_mlp(dispatch):
    if dispatch == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    dense = GatedMLP(16, 24, "silu", 0.0, bias=False)
    layer = MoELayer.from_dense(dense, 1, dropless=True, jitter=0.0, dispatch=dispatch).eval()
    with torch.no_grad():
        layer.experts.gate_weight[0].copy_(dense.gate.weight)
        layer.experts.fc_weight[0].copy_(dense.fc.weight)
        layer.experts.proj_weight[0].copy_(dense.proj.weight)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["bmm", "grouped_mm"])
def test_gated_experts_equal_the_written_out_reference(dispatch):
    if dispatch == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    layer = MoELayer(16, 24, 4, top_k=2, dropless=True, jitter=0.0, activation=torch.nn.SiLU(), bias=True,
                     dispatch=dispatch, gated=True).eval()
    with torch.no_grad():
        for b in (layer.experts.fc_bias, layer.experts.gate_bias, layer.experts.proj_bias):
            b.normal_()
    x = torch.randn(3, 5, 16)
    ex = layer.experts
    xf = x.reshape(-1, 16)
    probs = (xf @ layer.router.weight.t()).softmax(-1)
    top_p, top_e = probs.topk(2, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    expected = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for s in range(2):
            e = int(top_e[t, s])
            h = F.silu(F.linear(xf[t], ex.gate_weight[e], ex.gate_bias[e])) * F.linear(xf[t], ex.fc_weight[e], ex.fc_bias[e])
            expected[t] += gates[t, s] * F.linear(h, ex.proj_weight[e], ex.proj_bias[e])
    with torch.no_grad():
        torch.testing.assert_close(layer(x).reshape(-1, 16), expected, rtol=1e-4, atol=1e-5)


def test_switch_llama_trains(tmp_path, monkeypatch):
    import lmkit.api

    monkeypatch.setenv("LMKIT_CACHE", str(tmp_path / "cache"))
    summary = lmkit.api.run([
        "model=llama_tiny", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.d_model=32",
        "model.d_ff=64", "model.max_seq_len=64", "model.moe.num_experts=4", "model.moe.every=1",
        "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=20", "trainer.val_check_interval=10",
        "trainer.val_batches=2", "trainer.checkpoint_every_n_steps=10", "trainer.progress_bar=false",
        "logger=none", "scheduler.warmup_steps=1", "callbacks=[]",
    ], tmp_path / "run")
    assert summary["steps"] == 20
    assert summary["end"]["val/loss"] < summary["start"]["val/loss"] - 0.5
    state = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.blocks.0.mlp.experts.gate_weight"].shape == (4, 64, 32)
