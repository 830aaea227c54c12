"""apply_moe on the built-in GPT: placement, sizing, padding-mask plumbing, aux losses."""
import importlib.metadata

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lmkit.models.base import collect_aux_losses
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.layers import MLP
from lmkit_moe import MoEConfig, MoELayer, apply_moe, moe_layers, moe_metrics
from moe_helpers import seeded  # noqa: F401


def gpt(n_layer=4, d_ff=None, **kw):
    return GPT(GPTConfig(vocab_size=37, n_layer=n_layer, n_head=2, d_model=16, d_ff=d_ff, max_seq_len=32, **kw))


def batch(B=2, T=12):
    ids = torch.randint(0, 37, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 8:] = False
    return ids, mask


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="lmkit")
    assert any(ep.name == "moe" and ep.value == "lmkit_moe.plugin" for ep in eps)
    (ep,) = [e for e in eps if e.name == "moe"]
    assert callable(ep.load().apply_moe)


def test_every_second_block_sized_from_dense_mlp():
    model = apply_moe(gpt(d_ff=24, dropout=0.1), {"num_experts": 8, "every": 2})
    kinds = [type(b.mlp) for b in model.transformer_blocks()]
    assert kinds == [MLP, MoELayer, MLP, MoELayer]
    layer = model.blocks[1].mlp
    assert (layer.d_model, layer.d_ff, layer.num_experts) == (16, 24, 8)
    assert layer.experts.fc_weight.shape == (8, 24, 16) and layer.experts.proj_weight.shape == (8, 16, 24)
    assert layer.drop.p == 0.1 and layer.experts.fc_bias is not None
    assert [n for n, _ in moe_layers(model)] == ["blocks.1.mlp", "blocks.3.mlp"]
    # dense-init scale carried over (GPT-2 scaled residual projection is smaller)
    assert layer.experts.proj_weight.std() < layer.experts.fc_weight.std()


def test_config_from_omegaconf():
    from omegaconf import OmegaConf

    cfg = MoEConfig.from_any(OmegaConf.create({"num_experts": 8, "every": 2, "top_k": 2}))
    assert (cfg.num_experts, cfg.every, cfg.top_k, cfg.capacity_factor) == (8, 2, 2, 1.25)
    assert MoEConfig.from_any(None).num_experts == 0


def test_off_and_double_apply():
    model = gpt()
    assert apply_moe(model, MoEConfig()) is model
    assert not moe_layers(model)
    apply_moe(model, MoEConfig(num_experts=2))
    assert len(moe_layers(model)) == 2  # default every=2: blocks 1 and 3 (Switch layout)
    with pytest.raises(ValueError, match="already applied"):
        apply_moe(model, {"num_experts": 2})
    with pytest.raises(ValueError, match="unknown moe setting"):
        apply_moe(gpt(), {"num_experts": 2, "experts": 3})
    with pytest.raises(ValueError, match="selects no block"):
        apply_moe(gpt(n_layer=2), {"num_experts": 2, "every": 3})


def test_padding_mask_reaches_layers_through_model_hook():
    model = apply_moe(gpt(), {"num_experts": 4, "every": 2, "jitter": 0.0})
    model.eval()
    ids, mask = batch()
    seen = []
    for _, layer in moe_layers(model):
        layer.register_forward_hook(lambda m, a, out: seen.append((m.mask_source.masks["padding_mask"], m._last)))
    model(ids, padding_mask=mask)
    assert len(seen) == 2
    for m, last in seen:
        assert m is mask
        assert last["assignments"] == int(mask.sum())        # padding tokens were not counted
    seen.clear()
    model(ids)                                                # no mask: replaced by None
    assert all(m is None for m, _ in seen)
    assert all(last["assignments"] == ids.numel() for _, last in seen)


def test_padding_masked_model_losses_equal_unpadded_sequence():
    model = apply_moe(gpt(), {"num_experts": 4, "every": 1, "jitter": 0.0})
    model.eval()
    ids = torch.randint(0, 37, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, 12:] = False
    h_pad = model(padded, padding_mask=mask)
    aux_pad = collect_aux_losses(model)
    h = model(ids)
    aux = collect_aux_losses(model)
    assert torch.allclose(h_pad[0, :12], h[0], atol=1e-5)
    for key in ("moe_aux_loss", "moe_z_loss"):
        assert torch.allclose(aux_pad[key], aux[key], rtol=1e-5), key


def test_collect_aux_losses_averages_over_layers_and_backprops():
    model = apply_moe(gpt(), {"num_experts": 4, "every": 2})
    ids, mask = batch()
    hidden = model(ids, padding_mask=mask)
    aux = collect_aux_losses(model)
    assert set(aux) == {"moe_aux_loss", "moe_z_loss"}
    layers = [l for _, l in moe_layers(model)]
    mean_aux = sum(l.lmkit_aux_losses()["moe_aux_loss"] for l in layers) / 2
    assert torch.allclose(aux["moe_aux_loss"], mean_aux)
    (hidden.square().mean() + sum(aux.values())).backward()
    for layer in layers:
        assert layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.fc_weight.grad.abs().sum() > 0
    metrics = moe_metrics(model)
    assert {"moe/blocks.1.mlp/expert_load/0", "moe/blocks.3.mlp/dropped_fraction",
            "moe/aux_loss", "moe/z_loss", "moe/dropped_fraction"} <= set(metrics)
    loads = [metrics[f"moe/blocks.1.mlp/expert_load/{i}"] for i in range(4)]
    assert torch.allclose(sum(loads), torch.tensor(1.0))


def test_activation_checkpointing_recompute_sees_the_mask():
    """Recompute in backward must route exactly as the forward did (mask kept, same jitter)."""
    ids, mask = batch(B=3, T=16)
    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(0)
        model = apply_moe(gpt(), {"num_experts": 4, "every": 1, "jitter": 0.05, "capacity_factor": 1.0})
        if use_ckpt:
            for block in model.blocks:
                block.forward = (lambda f: lambda x, mask=None, is_causal=True:
                                 checkpoint(f, x, mask, is_causal, use_reentrant=False))(block.forward)
        torch.manual_seed(1)
        hidden = model(ids, padding_mask=mask)
        loss = hidden[mask].square().mean() + sum(collect_aux_losses(model).values())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
