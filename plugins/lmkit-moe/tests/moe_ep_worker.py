"""Worker of the 2-rank expert-parallel test (spawned; gloo on 127.0.0.1)."""
import copy
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmkit_moe import (
    MoELayer,
    apply_expert_parallel,
    expert_parameter_names,
    full_expert_state_dict,
    grouped_mm_supported,
    load_full_expert_state_dict,
)

D, F, E, B, T = 16, 24, 4, 2, 8


class Net(nn.Module):
    """A replicated (data-parallel) layer in front of an MoE layer."""

    def __init__(self, **moe_kw):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(D, F, E, jitter=0.0, **moe_kw)

    def forward(self, x, padding_mask=None):
        return self.moe(self.inp(x), padding_mask=padding_mask)


def close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def run_case(rank, world, moe_kw, route_to=None, pad_last_rank=False):
    torch.manual_seed(0)
    ref = Net(**moe_kw)
    if route_to is not None:               # every token to one expert: other ranks receive nothing
        with torch.no_grad():
            ref.inp.weight[0].zero_()
            ref.inp.bias[0] = 1.0
            ref.moe.router.weight.zero_()
            ref.moe.router.weight[route_to, 0] = 100.0
    ep = copy.deepcopy(ref)
    x_all = torch.randn(world * B, T, D)
    g_all = torch.randn(world * B, T, D)
    mask_all = torch.ones(world * B, T, dtype=torch.bool)
    if pad_last_rank:
        mask_all[(world - 1) * B:] = False

    # single process, whole batch
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref, padding_mask=mask_all)
    ((y_ref * g_all).sum() / (world * B * T)).backward()
    assert ref.moe.lmkit_metrics()["dropped_fraction"] == 0

    # expert parallel + DDP for the rest, each rank its slice
    apply_expert_parallel(ep)
    assert ep.moe.experts.num_experts == E // world and ep.moe.experts.first_expert == rank * (E // world)
    assert sorted(expert_parameter_names(ep)) == sorted(
        f"moe.experts.{n}" for n in ("fc_weight", "fc_bias", "proj_weight", "proj_bias"))
    received = []
    ep.moe.experts.register_forward_pre_hook(lambda m, args: received.append(int(args[1].sum())))
    model = DDP(ep)
    sl = slice(rank * B, (rank + 1) * B)
    x = x_all[sl].clone().requires_grad_()
    y = model(x, padding_mask=mask_all[sl])
    ((y * g_all[sl]).sum() / (B * T)).backward()

    close(y, y_ref[sl], "forward")
    close(x.grad / world, x_ref.grad[sl], "input grad")
    ref_params = dict(ref.named_parameters())
    first, per = ep.moe.experts.first_expert, ep.moe.experts.num_experts
    for name, p in ep.named_parameters():
        expected = ref_params[name].grad
        if getattr(p, "_lmkit_expert_parallel", False):
            expected = expected[first:first + per]
        close(p.grad, expected, f"grad of {name}")
    if route_to is not None and rank != route_to // per:
        assert received == [0], received               # this rank's experts got no tokens
    if pad_last_rank and rank == world - 1:
        assert torch.count_nonzero(y) == 0
    return ref, ep


def checks(rank, world):
    # 1. top-1, capacity large enough that nothing drops; grouped GEMM path where available
    gmm = "grouped_mm" if grouped_mm_supported("cpu", None, torch.float32) else "bmm"
    ref, ep = run_case(rank, world, dict(capacity_factor=float(E), dispatch=gmm))
    full = full_expert_state_dict(ep)
    for k, v in ref.state_dict().items():
        close(full[k], v, f"gathered {k}")
    other = Net(capacity_factor=float(E))                       # different weights
    apply_expert_parallel(other)
    load_full_expert_state_dict(other, full)
    for k, v in ep.state_dict().items():
        close(other.state_dict()[k], v, f"loaded {k}")
    # 1b. bf16 autocast: bf16 rows through gloo's all_to_all_single, forward and backward
    x_all = torch.randn(world * B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ep(x_all[rank * B:(rank + 1) * B])
        y_ref = ref(x_all)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref[rank * B:(rank + 1) * B].float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    # 2. top-2, dropless, padded-bmm fallback path
    run_case(rank, world, dict(top_k=2, dropless=True, dispatch="bmm"))
    # 3. every token to expert 0 (rank 0): rank 1 receives zero tokens
    run_case(rank, world, dict(dropless=True), route_to=0)
    # 4. ... and rank 1's batch is all padding: it sends and receives nothing
    run_case(rank, world, dict(dropless=True), route_to=0, pad_last_rank=True)
    # 5. experts not divisible by the expert-parallel size
    bad = MoELayer(D, F, 3)
    try:
        apply_expert_parallel(bad)
    except ValueError as err:
        assert "not divisible by the expert-parallel size 2" in str(err)
    else:
        raise AssertionError("no ValueError for 3 experts on 2 ranks")
    assert bad.experts.num_experts == 3 and bad.ep_group is None


def worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        checks(rank, world)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    from lmkit.process_exit import exit_process

    exit_process(0)  # not a plain return: gloo threads alive at interpreter finalization can abort a rank
