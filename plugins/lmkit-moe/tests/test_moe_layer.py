"""MoE layer: losses, capacity, dropping, precision, determinism, dispatch paths."""
import math

import pytest
import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit_moe import (
    MoEConfig,
    MoEConfigError,
    MoELayer,
    expert_capacity,
    grouped_mm_supported,
    load_balancing_loss,
    router_z_loss,
    validate_expert_parallel,
)
from moe_helpers import reference_moe, seeded  # noqa: F401

ALPHA = 0.01


def make_layer(E=4, D=16, F=32, **kw):
    kw.setdefault("jitter", 0.0)
    return MoELayer(D, F, E, **kw)


def route_all_to(layer, expert, scale=1e4):
    """Router weights that send every token with positive first feature to ``expert``."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[expert, 0] = scale


# ---------------------------------------------------------------- aux / z losses

def test_uniform_routing_gives_alpha_exactly():
    E, T = 4, 32
    probs = torch.full((T, E), 1.0 / E)
    idx = (torch.arange(T) % E)[:, None]
    loss = load_balancing_loss(probs, idx, E)
    assert loss.item() == 1.0                                           # exactly
    assert torch.equal(ALPHA * loss, torch.tensor(ALPHA))               # α exactly (in float32)
    # top-2 with uniform assignment too
    idx2 = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    assert load_balancing_loss(probs, idx2, E).item() == 1.0


def test_near_uniform_router_in_layer_gives_alpha():
    E = 4
    layer = make_layer(E=E, D=E, F=8, aux_loss_coef=ALPHA)
    with torch.no_grad():
        layer.router.weight.copy_(1e-4 * torch.eye(E))
    x = torch.eye(E).repeat(8, 1)[None]          # tokens cycle over experts; probs ~ 1/E
    layer(x)
    aux = layer.lmkit_aux_losses()["moe_aux_loss"]
    assert aux.item() == pytest.approx(ALPHA, rel=1e-6)
    assert layer.lmkit_metrics()["expert_load/2"].item() == pytest.approx(0.25)


def test_all_tokens_on_one_expert_gives_alpha_times_n():
    E = 8
    layer = make_layer(E=E, aux_loss_coef=ALPHA)
    route_all_to(layer, 3)
    x = torch.randn(2, 16, 16)
    x[..., 0] = x[..., 0].abs() + 1.0
    layer(x)
    assert layer.lmkit_aux_losses()["moe_aux_loss"].item() == pytest.approx(ALPHA * E, rel=1e-5)
    assert layer.lmkit_metrics()["expert_load/3"].item() == 1.0


def test_zero_logits_give_ln_n_squared_z_loss():
    E = 8
    layer = make_layer(E=E, z_loss_coef=1e-3)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(2, 8, 16))
    z = layer.lmkit_aux_losses()["moe_z_loss"]
    assert z.item() == pytest.approx(1e-3 * math.log(E) ** 2, rel=1e-6)
    assert router_z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_masked_losses_and_outputs_equal_unpadded(top_k):
    layer = make_layer(E=4, top_k=top_k, capacity_factor=1.0)
    x = torch.randn(3, 10, 16)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[2, 2:] = False
    y = layer(x, padding_mask=mask)
    padded = layer.lmkit_aux_losses()
    padded_dropped = layer.lmkit_metrics()["dropped_fraction"]
    y_ref = layer(x[mask][None])                # only the real tokens, no mask
    ref = layer.lmkit_aux_losses()
    for key in ("moe_aux_loss", "moe_z_loss"):
        assert torch.allclose(padded[key], ref[key], rtol=1e-6, atol=0), key
    assert torch.allclose(padded_dropped, layer.lmkit_metrics()["dropped_fraction"])
    assert torch.allclose(y[mask], y_ref[0], atol=1e-6)
    assert torch.count_nonzero(y[~mask]) == 0   # padding tokens are not routed
    # and the mask really matters for the losses
    layer(x)
    assert not torch.allclose(layer.lmkit_aux_losses()["moe_z_loss"], ref["moe_z_loss"])


# ---------------------------------------------------------------- capacity / dropping

def test_capacity_formula():
    assert expert_capacity(64, 8, 1.25) == 10          # ceil(64 / 8 * 1.25)
    assert expert_capacity(64, 8, 2.0) == 16
    assert expert_capacity(10, 4, 1.25) == 4           # ceil(3.125)
    assert expert_capacity(64, 8, 1.25, top_k=2) == 20
    assert expert_capacity(0, 8, 1.25) == 0
    layer = make_layer(E=8)
    assert layer.capacity(64) == 10
    layer.eval()
    assert layer.capacity(64) == 16


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_every_expert_processes_at_most_capacity(dispatch):
    if dispatch == "grouped_mm" and not grouped_mm_supported("cpu", None, torch.float32):
        pytest.skip("torch._grouped_mm unavailable")
    layer = make_layer(E=4, dispatch=dispatch)
    with torch.no_grad():
        layer.router.weight.mul_(50)                # sharp, unbalanced routing
    seen = []
    layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    x = torch.randn(4, 16, 16)
    layer(x)
    cap = layer.capacity(64)
    assert cap == 20
    counts = seen[-1]
    assert counts.sum() == int(layer._last["kept"].sum())
    assert (counts <= cap).all()
    assert layer.lmkit_metrics()["dropped_fraction"] > 0      # routing was skewed enough to drop


def test_dropped_token_output_is_zero_and_block_output_is_residual():
    from lmkit.models.gpt import Block, GPTConfig

    block = Block(GPTConfig(d_model=16, n_head=2, vocab_size=11))
    block.mlp = layer = MoELayer.from_dense(block.mlp, 4, capacity_factor=0.25, jitter=0.0)
    captured = {}
    # ln_2's input is the residual stream entering the MLP sub-layer.
    block.ln_2.register_forward_pre_hook(lambda m, a: captured.__setitem__("residual", a[0].clone()))
    layer.register_forward_hook(lambda m, a, out: captured.__setitem__("mlp_out", out.clone()))
    with torch.no_grad():
        out = block(torch.randn(1, 16, 16))
        h = block.ln_2(captured["residual"])[0]
        expert = (h @ layer.router.weight.t()).argmax(-1)
    assert layer.capacity(16) == 1                       # ceil(16 / 4 * 0.25)
    # With capacity 1, only each expert's first token is kept; all later ones are dropped.
    first = {}
    dropped = torch.zeros(16, dtype=torch.bool)
    for t, e in enumerate(expert.tolist()):
        if e in first:
            dropped[t] = True
        else:
            first[e] = t
    assert dropped.sum() >= 12
    assert torch.count_nonzero(captured["mlp_out"][0, dropped]) == 0
    assert torch.equal(out[0, dropped], captured["residual"][0, dropped])
    assert (captured["mlp_out"][0, ~dropped].abs().sum(-1) > 0).all()
    assert layer.lmkit_metrics()["dropped_fraction"].item() == pytest.approx(dropped.float().mean().item())


def test_dropless_keeps_every_token():
    layer = make_layer(E=4, dropless=True, top_k=2)
    route_all_to(layer, 1)
    x = torch.randn(2, 16, 16)
    y = layer(x)
    assert layer.capacity(32) is None
    assert layer.lmkit_metrics()["dropped_fraction"] == 0
    ref, _ = reference_moe(layer, x)
    assert torch.allclose(y, ref, atol=1e-5)


# ---------------------------------------------------------------- precision / determinism

def test_router_logits_float32_under_bf16_autocast():
    layer = make_layer(E=4)
    seen = {}
    layer.router.register_forward_hook(lambda m, a, out: seen.__setitem__("logits", out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 8, 16))
    assert seen["logits"].dtype == torch.float32
    assert y.dtype == torch.bfloat16                     # experts follow autocast
    assert layer.lmkit_aux_losses()["moe_aux_loss"].dtype == torch.float32


def test_eval_is_deterministic_and_jitter_is_train_only():
    layer = make_layer(E=4, top_k=2, jitter=0.1, dropout=0.1)
    x = torch.randn(2, 16, 16)
    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    layer.train()
    logits = []
    layer.router.register_forward_hook(lambda m, a, out: logits.append(out))
    layer(x)
    layer(x)
    assert not torch.equal(logits[0], logits[1])          # jitter is on in training


# ---------------------------------------------------------------- dispatch correctness

@pytest.mark.parametrize("top_k,cf", [(1, 1.0), (2, 1.25), (1, 8.0)])
def test_matches_reference_and_paths_agree(top_k, cf):
    layers = {}
    for dispatch in ("bmm", "grouped_mm"):
        if dispatch == "grouped_mm" and not grouped_mm_supported("cpu", None, torch.float32):
            continue
        torch.manual_seed(1)
        layers[dispatch] = make_layer(E=4, top_k=top_k, capacity_factor=cf, dispatch=dispatch)
    x = torch.randn(3, 12, 16)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 9:] = False
    grads = {}
    for dispatch, layer in layers.items():
        xr = x.clone().requires_grad_()
        y = layer(xr, padding_mask=mask)
        ref, fill = reference_moe(layer, x, mask)
        assert torch.allclose(y, ref, atol=1e-5), dispatch
        assert layer._last["kept"].tolist() == fill
        (y * torch.linspace(-1, 1, 16)).sum().backward()
        grads[dispatch] = [xr.grad] + [p.grad for p in layer.parameters()]
    if len(grads) == 2:
        for a, b in zip(grads["bmm"], grads["grouped_mm"]):
            assert torch.allclose(a, b, atol=1e-5)


def test_grouped_mm_probe_on_cpu():
    assert grouped_mm_supported("cpu", None, torch.float64) is False     # not a supported dtype
    assert grouped_mm_supported("cpu", None, torch.float32) == hasattr(torch, "_grouped_mm")
    layer = make_layer(E=4)
    assert not layer.experts.use_grouped_mm(torch.device("cpu"), torch.float32)   # auto: bmm on CPU
    layer.experts.dispatch = "grouped_mm"
    assert layer.experts.use_grouped_mm(torch.device("cpu"), torch.float32)


def test_aux_losses_reach_router_gradient():
    layer = make_layer(E=4)
    layer(torch.randn(2, 8, 16))
    sum(layer.lmkit_aux_losses().values()).backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=4, top_k=5), "top_k=5 is larger than moe.num_experts=4"),
    (dict(num_experts=4, capacity_factor=0.0), "capacity_factor must be a finite number > 0"),
    (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(num_experts=4, eval_capacity_factor=0), "eval_capacity_factor"),
    (dict(num_experts=4, every=0), "every"),
    (dict(num_experts=-1), "num_experts"),
    (dict(num_experts=4, dispatch="loop"), "dispatch"),
])
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        MoEConfig(**kwargs)
    assert isinstance(info.value, ConfigError)


def test_bad_layer_args_and_ep_size_raise_value_error():
    with pytest.raises(ValueError, match="top_k=3 is larger"):
        MoELayer(8, 16, 2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 16, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        validate_expert_parallel(6, 4)
    with pytest.raises(MoEConfigError):
        validate_expert_parallel(3, 2)
    validate_expert_parallel(4, 2)


def test_mask_shape_mismatch_is_clear():
    layer = make_layer()
    with pytest.raises(ValueError, match="padding_mask of shape"):
        layer(torch.randn(2, 8, 16), padding_mask=torch.ones(2, 9, dtype=torch.bool))


def test_from_dense_rejects_non_mlp():
    with pytest.raises(ValueError, match="no `fc` nn.Linear"):
        MoELayer.from_dense(nn.Identity(), 4)
