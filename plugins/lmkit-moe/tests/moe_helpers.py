"""Shared test helpers (no conftest.py, so that this directory never shadows another
suite's ``conftest`` module when collected together with it)."""
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state (import into a test module to enable)."""
    torch.manual_seed(0)
    yield


def reference_moe(layer, x, padding_mask=None):
    """Loop-over-assignments reference of MoELayer.forward (no jitter, no dropout).

    Independent of the layer's sort/dispatch code: it re-derives routing, slot-major
    priority and capacity from the definitions.
    """
    D = x.shape[-1]
    xf = x.reshape(-1, D).float()
    n = xf.shape[0]
    valid = torch.ones(n, dtype=torch.bool) if padding_mask is None else padding_mask.reshape(-1).bool()
    logits = xf @ layer.router.weight.float().t()
    probs = logits.softmax(-1)
    top_p, top_e = probs.topk(layer.top_k, dim=-1)
    gates = top_p if layer.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    cap = layer.capacity(int(valid.sum()))
    ex = layer.experts
    fill = [0] * layer.num_experts
    out = torch.zeros(n, D)
    for s in range(layer.top_k):
        for t in range(n):
            if not valid[t]:
                continue
            e = int(top_e[t, s])
            if cap is not None and fill[e] >= cap:
                continue
            fill[e] += 1
            h = F.linear(xf[t], ex.fc_weight[e], None if ex.fc_bias is None else ex.fc_bias[e])
            y = F.linear(ex.act(h), ex.proj_weight[e], None if ex.proj_bias is None else ex.proj_bias[e])
            out[t] = out[t] + gates[t, s] * y
    return out.view(x.shape), fill
