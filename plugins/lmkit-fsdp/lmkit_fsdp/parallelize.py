"""Parallelize a built lmkit model from outside, torchtitan-style, in a fixed order:

1. tensor parallelism (``strategy=fsdp_tp``): the architecture family's plan splits each
   block over the ``tensor_parallel`` mesh dimension (:mod:`lmkit_fsdp.families`);
2. activation checkpointing per block (``strategy.activation_checkpointing``);
3. FSDP2 ``fully_shard`` per block, then the objective's heads, then the whole model (root)
   over the ``data_parallel`` mesh dimension, with the mixed-precision and CPU-offload
   policies; models the objective only uses (``objective.frozen_models()``: a distillation
   teacher) are sharded the same way.

It runs inside ``LightningModule.configure_model`` once the process group and the device
mesh exist (``lm_module.device_mesh``, made by :class:`~lmkit_fsdp.strategy.LmkitModelParallelStrategy`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lmkit_fsdp.config import DTYPES


def parallelize(lm_module, run, cfg, strategy=None) -> None:
    """Apply TP, activation checkpointing and FSDP2 to ``lm_module.model`` (and the objective's heads) in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = lm_module.device_mesh
    dp_mesh, tp_mesh = mesh["data_parallel"], mesh["tensor_parallel"]
    model = lm_module.model
    arch = getattr(getattr(run, "model", None), "name", None) if run is not None else None
    names = {id(m): n for n, m in lm_module.named_modules()}

    # 1. tensor parallelism
    if tp_mesh.size() > 1:
        from lmkit_fsdp.families import plan_for

        plan = plan_for(model, tp_mesh.size(), arch)
        fusions = []
        for block in model.transformer_blocks():
            prefix = names[id(block)]
            fusions += [f.prefixed(prefix) for f in plan.parallelize_block(block, tp_mesh)]
        if strategy is not None:
            strategy.layout.extend(fusions)

    blocks = _shardable_blocks(model)

    # 2. activation checkpointing (composable: parameter names stay as they are)
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.transformer_blocks():
            checkpoint(block)

    # 3. FSDP2
    if cfg.mixed_precision != "none":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.mixed_precision], reduce_dtype=DTYPES[cfg.reduce_dtype])
    else:
        mp = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
    # the objective's heads: sharded when all their parameters are their own; parameters the
    # objective holds directly (e.g. an output bias) or heads that share the model's weights
    # stay replicated, their gradients averaged over the data-parallel ranks
    model_params = {id(p) for p in model.parameters()}
    objective = lm_module.objective
    replicated = [p for p in objective.parameters(recurse=False) if id(p) not in model_params]
    for child in objective.children():
        params = list(child.parameters())
        own = [p for p in params if id(p) not in model_params]
        if own and len(own) == len(params):
            fully_shard(child, mesh=dp_mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp,
                        offload_policy=offload)
        else:
            replicated += own
    _average_gradients(replicated, dp_mesh)
    # models the objective uses but does not train (a distillation teacher), held outside the module
    # tree: sharded the same way, per block then root, with the same mixed-precision policy
    frozen_models = getattr(objective, "frozen_models", None)
    for frozen in frozen_models() if callable(frozen_models) else []:
        for block in _shardable_blocks(frozen):
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(frozen, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    # the root keeps its parameters gathered after forward: the tied output embedding is used
    # by the objective (model.logits) right after the model's forward
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)


def _average_gradients(params: list[nn.Parameter], dp_mesh) -> None:
    """Keep ``params`` replicated: average each gradient over the data-parallel ranks as it accumulates.

    Averaging is linear, so doing it after every micro-batch's accumulation gives the
    average of the accumulated gradient (the already-averaged part is equal on all ranks).
    """
    params = [p for p in params if p.requires_grad]
    if not params or dp_mesh.size() == 1:
        return
    import torch.distributed as dist

    group, n = dp_mesh.get_group(), dp_mesh.size()

    def hook(p):
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(n)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def _shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP wraps one by one; none when blocks share parameters (ALBERT), which the root then shards."""
    blocks = model.transformer_blocks() if hasattr(model, "transformer_blocks") else []
    seen: set[int] = set()
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        if ids & seen:
            return []
        seen |= ids
    return blocks


# --- gradient clipping across meshes ----------------------------------------------------


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters on several device meshes (and plain tensors).

    Gradients are grouped by mesh; each group's norm is reduced over its mesh (DTensor does
    that) and the group norms combined, so the total is the norm of the whole, unsharded
    gradient. Returns the total norm (before clipping) as a plain tensor.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    groups: dict = {}
    for g in grads:
        key = (id(g.device_mesh), g.device_mesh.mesh_dim_names) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    from lmkit_fsdp.layout import _full

    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(_full(n).float().cpu())  # reduced over the group's mesh, one dimension at a time
    total = torch.stack(norms).max() if math.isinf(norm_type) else torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # every rank must scale by the very same factor, or replicated copies drift apart by rounding
        device = grads[0].device if not isinstance(grads[0], DTensor) else grads[0].to_local().device
        t = total.to(device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        total = t.cpu()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # as torch.nn.utils.clip_grad_norm_ does
    if coef < 1.0:
        for group in groups.values():
            torch._foreach_mul_(group, coef)
    return total
