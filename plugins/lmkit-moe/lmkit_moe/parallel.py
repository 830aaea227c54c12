"""Expert parallelism: experts sharded over a process group, tokens exchanged all-to-all.

With ``W`` ranks in the expert-parallel group and ``E`` experts, rank ``r`` holds experts
``r·E/W … (r+1)·E/W - 1``. The router and every non-expert parameter stay replicated and
keep ordinary data-parallel treatment. One MoE forward on each rank:

1. route its own tokens and sort the kept ones by global expert (see ``MoELayer``);
2. exchange per-expert counts (``all_to_all_single`` of an [E] tensor, equal splits);
3. send each rank the rows of its experts (``all_to_all_single``, uneven splits, autograd
   aware: its backward is the reverse exchange), regroup the received rows per local
   expert and run them;
4. send the results back the same way.

Every rank calls every collective whatever its token counts: a rank that sends or
receives zero rows takes part with empty tensors, so it cannot hang (DeepSpeed #6809).

Gradients: an expert on rank r sees the tokens of all ranks, so its local gradient is the
sum of every rank's loss gradient; expert gradients are scaled by ``1/W`` so that they
equal what data parallelism gives replicated parameters (the mean over ranks). Expert
parameters are marked ``_lmkit_expert_parallel = True`` and must be left out of DDP's
all-reduce (:func:`exclude_expert_params_from_ddp`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmkit_moe.layer import GroupedExperts, MoEConfigError, MoELayer, moe_layers

EXPERT_PARAM_NAMES = ("fc_weight", "fc_bias", "proj_weight", "proj_bias", "gate_weight", "gate_bias")


class AllToAllSingle(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with uneven splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all_single(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of ``x``'s rows (see :class:`AllToAllSingle`)."""
    return AllToAllSingle.apply(x, list(output_splits), list(input_splits), group)


def expert_parallel_apply(experts: GroupedExperts, x_rows: torch.Tensor, counts: torch.Tensor, group) -> torch.Tensor:
    """Run rows grouped by *global* expert (``counts`` [E]) on the experts' owning ranks.

    Returns the expert outputs for ``x_rows``, in the same order.
    """
    world = dist.get_world_size(group)
    local = experts.num_experts
    counts = counts.to(torch.long).contiguous()
    if counts.numel() != world * local:
        raise RuntimeError(f"expected counts for {world * local} experts, got {counts.numel()}")
    recv_counts = torch.empty_like(counts)                     # [W·E_local]: (source rank, local expert)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(world, local).sum(1).tolist()
    recv_by_src = recv_counts.view(world, local)
    recv_splits = recv_by_src.sum(1).tolist()

    x_recv = AllToAllSingle.apply(x_rows, recv_splits, send_splits, group)
    # Received rows are ordered (source, local expert); the experts want (local expert, source).
    m = x_recv.shape[0]
    chunk_expert = torch.arange(local, device=x_recv.device).repeat(world)
    row_expert = torch.repeat_interleave(chunk_expert, recv_counts.to(x_recv.device), output_size=m)
    perm = torch.argsort(row_expert, stable=True)
    y_local = experts(x_recv[perm], recv_by_src.sum(0))
    y_recv = y_local.new_zeros((m,) + tuple(y_local.shape[1:])).index_copy(0, perm, y_local)
    return AllToAllSingle.apply(y_recv, send_splits, recv_splits, group)


def validate_expert_parallel(num_experts: int, ep_size: int) -> None:
    """Raise :class:`MoEConfigError` (a ValueError) unless ``num_experts`` splits evenly over ``ep_size`` ranks."""
    if ep_size < 1 or num_experts % ep_size:
        raise MoEConfigError(
            f"moe.num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}; "
            f"choose a multiple of {ep_size} experts (or a smaller expert-parallel group)")


def shard_experts(experts: GroupedExperts, rank: int, world: int) -> None:
    """Keep only rank ``rank``'s slice of ``experts`` (in place; new Parameters)."""
    validate_expert_parallel(experts.num_experts, world)
    per = experts.num_experts // world
    with torch.no_grad():
        for name in EXPERT_PARAM_NAMES:
            p = getattr(experts, name)
            if p is None:
                continue
            new = nn.Parameter(p.detach()[rank * per:(rank + 1) * per].clone(), requires_grad=p.requires_grad)
            new._lmkit_expert_parallel = True
            setattr(experts, name, new)
    experts.first_expert = experts.first_expert + rank * per
    experts.num_experts = per


def apply_expert_parallel(model: nn.Module, group=None, grad_scale: float | None = None) -> list[MoELayer]:
    """Shard every :class:`MoELayer` of ``model`` over ``group`` (default: the world).

    Call after ``torch.distributed`` is initialized and before the optimizer is built;
    every rank must start from the same full expert weights (same seed). ``grad_scale``
    multiplies expert gradients (default ``1/W``: see the module docstring). Raises
    :class:`MoEConfigError` (a ValueError) when the experts do not split evenly.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialized torch.distributed process group")
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [layer for _, layer in moe_layers(model)]
    for layer in layers:  # validate all before touching any
        if layer.ep_group is not None:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
        validate_expert_parallel(layer.num_experts, world)
    for layer in layers:
        shard_experts(layer.experts, rank, world)
        layer.ep_group, layer.ep_size = group, world
        layer.experts.grad_scale = 1.0 / world if grad_scale is None else grad_scale
    exclude_expert_params_from_ddp(model)
    return layers


def expert_parameter_names(root: nn.Module) -> list[str]:
    """Qualified names (relative to ``root``) of the expert-parallel (sharded) parameters."""
    return [name for name, p in root.named_parameters() if getattr(p, "_lmkit_expert_parallel", False)]


def exclude_expert_params_from_ddp(root: nn.Module) -> list[str]:
    """Tell DDP to leave the sharded expert parameters out of its all-reduce.

    Call it on the module that DDP wraps (e.g. the LightningModule) before wrapping.
    """
    names = expert_parameter_names(root)
    if names:
        from torch.nn.parallel import DistributedDataParallel
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, names)
    return names


def full_expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded expert tensor all-gathered to its full size.

    A collective: every rank of the expert-parallel groups must call it.
    """
    state = {k: v for k, v in model.state_dict().items()}
    for name, layer in moe_layers(model):
        if layer.ep_group is None:
            continue
        world = dist.get_world_size(layer.ep_group)
        for pname in EXPERT_PARAM_NAMES:
            p = getattr(layer.experts, pname)
            if p is None:
                continue
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous(), group=layer.ep_group)
            key = f"{name}.experts.{pname}" if name else f"experts.{pname}"
            state[key] = torch.cat(parts)
    return state


def load_full_expert_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a full (unsharded) state dict into an expert-parallel model: each rank takes its slice."""
    state = dict(state_dict)
    for name, layer in moe_layers(model):
        if layer.ep_group is None:
            continue
        first, per = layer.experts.first_expert, layer.experts.num_experts
        for pname in EXPERT_PARAM_NAMES:
            key = f"{name}.experts.{pname}" if name else f"experts.{pname}"
            if key in state and state[key].shape[0] != per:
                state[key] = state[key][first:first + per]
    return model.load_state_dict(state, strict=strict)
