"""``strategy=expert_parallel``: DDP with the MoE experts sharded over the ranks.

Every rank holds the replicated (dense) parameters, all-reduced by DDP, and ``E/W`` experts
of every MoE layer; tokens travel to their expert's rank and back through
``all_to_all_single`` (:mod:`lmkit_moe.parallel`). The strategy adds what plain DDP gets
wrong once parameters are sharded:

* **Sharding** happens in ``LightningModule.configure_model`` (the plan's ``parallelize``):
  after the process group exists, before DDP wraps the module, which is told to leave the
  expert parameters out of its all-reduce (and out of its rank-0 broadcast).
* **Checkpoints hold every expert**: the model state is gathered to full expert tensors
  when saving, and so is the optimizer state of the expert parameters; loading slices
  both back to the rank's experts. A checkpoint therefore loads into an expert-parallel
  run of any world size that divides the experts, and into a single-process run.
* **Gradient clipping** uses the global norm: the squared norms of the local expert
  gradients are summed over the ranks (plain clipping would clip every rank differently,
  and the replicated parameters would drift apart).
* **Validation** batches are equalized over the ranks (every forward is a collective):
  each rank runs the smallest per-rank count, so a split that does not divide evenly
  drops at most ``W-1`` trailing batches instead of hanging.
"""
from __future__ import annotations

import itertools
import os
import types
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lmkit.strategies import StrategyPlan
from lmkit_moe.layer import MoEConfigError, moe_layers
from lmkit_moe.parallel import (
    EXPERT_PARAM_NAMES,
    apply_expert_parallel,
    exclude_expert_params_from_ddp,
    full_expert_state_dict,
    load_full_expert_state_dict,
    validate_expert_parallel,
)

STRATEGY_NAME = "expert_parallel"


@dataclass
class ExpertParallelConfig:
    """``strategy=expert_parallel`` settings.

    ``process_group_backend``: ``gloo`` / ``nccl`` (None: Lightning's choice for the
    accelerator). ``timeout_s``: the process group's collective timeout, so that a rank
    stuck in an all-to-all fails instead of hanging forever. ``find_unused_parameters``:
    passed to DDP (the replicated parameters only; experts are outside DDP).
    """

    name: str = STRATEGY_NAME
    process_group_backend: str | None = None
    find_unused_parameters: bool = False
    timeout_s: float = 1800.0

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise MoEConfigError(f"strategy.timeout_s must be > 0 seconds, got {self.timeout_s!r}")


# --------------------------------------------------------------------------- checks

def planned_world_size(trainer_cfg) -> int | None:
    """Ranks the run will have, when the config says (``trainer.devices`` × ``num_nodes``), else None."""
    if os.environ.get("WORLD_SIZE", "").isdigit():  # launched by torchrun / a cluster launcher
        return int(os.environ["WORLD_SIZE"])
    devices = getattr(trainer_cfg, "devices", None)
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        n = devices if devices > 0 else None
    elif isinstance(devices, str) and devices.strip().isdigit():
        n = int(devices)
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices == "auto" and getattr(trainer_cfg, "accelerator", None) == "cpu":
        n = 1
    else:
        n = None
    return None if n is None else n * int(getattr(trainer_cfg, "num_nodes", 1) or 1)


def check_run(moe_cfg, run) -> None:
    """Refuse, before any process starts, a strategy/MoE combination that cannot work.

    ``moe_cfg``: the validated ``model.moe`` (:class:`lmkit_moe.MoEConfig`) or None.
    """
    strategy = getattr(getattr(run, "strategy", None), "name", None)
    experts = getattr(moe_cfg, "num_experts", 0) or 0
    if strategy == STRATEGY_NAME:
        if experts == 0:
            raise MoEConfigError(
                "strategy=expert_parallel shards mixture-of-experts layers, but the model has none: "
                "set model.moe.num_experts=N (a multiple of the number of ranks), or use strategy=ddp")
        world = planned_world_size(getattr(run, "trainer", None))
        if world is not None:
            _validate_world(experts, world)
    elif getattr(moe_cfg, "expert_parallel", False):
        raise MoEConfigError(
            f"model.moe.expert_parallel=true needs strategy=expert_parallel (got strategy={strategy}); "
            "drop model.moe.expert_parallel or add strategy=expert_parallel")


def _validate_world(num_experts: int, world: int) -> None:
    try:
        validate_expert_parallel(num_experts, world)
    except MoEConfigError as e:
        raise MoEConfigError(
            f"{e}. strategy=expert_parallel splits every MoE layer's experts over all "
            f"{world} ranks (trainer.devices × trainer.num_nodes)") from None


# --------------------------------------------------------------------------- helpers

@dataclass
class _Shard:
    first: int
    per: int
    total: int
    group: object


def _expert_shards(root: torch.nn.Module) -> dict[int, _Shard]:
    """``id(parameter) -> _Shard`` for every sharded expert parameter under ``root``."""
    out = {}
    for _, layer in moe_layers(root):
        if layer.ep_group is None:
            continue
        ex = layer.experts
        for pname in EXPERT_PARAM_NAMES:
            p = getattr(ex, pname)
            if p is not None:
                out[id(p)] = _Shard(ex.first_expert, ex.num_experts, ex.total_experts, layer.ep_group)
    return out


def _flat_params(optimizer) -> list[torch.Tensor]:
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
    return [p for group in optimizer.param_groups for p in group["params"]]


def gather_expert_optimizer_state(optimizer, root: torch.nn.Module) -> dict:
    """``optimizer.state_dict()`` with the state of sharded expert parameters gathered to full size.

    A collective over the expert-parallel group. The optimizer's live state is not touched.
    Per-parameter tensors shaped like the local shard (Adam's moments) are all-gathered
    along the expert dimension; scalars (``step``) are kept.
    """
    shards = _expert_shards(root)
    state = getattr(optimizer, "_optimizer", optimizer).state_dict()
    state = {**state, "state": dict(state["state"])}
    todo = []
    for idx, p in enumerate(_flat_params(optimizer)):
        shard = shards.get(id(p))
        st = state["state"].get(idx)
        if shard is None:
            continue
        keys = sorted(k for k, v in (st or {}).items()
                      if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape))
        todo.append((idx, shard, keys))
    if not todo:
        return state
    group = todo[0][1].group
    signature = [(idx, keys) for idx, _, keys in todo]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, signature, group=group)
    if any(s != signature for s in everyone):
        raise RuntimeError("expert-parallel ranks hold different optimizer state keys for the expert "
                           "parameters; cannot gather a consistent checkpoint")
    for idx, shard, keys in todo:
        if not keys:
            continue
        st = dict(state["state"][idx])
        world = dist.get_world_size(shard.group)
        for k in keys:
            local = st[k].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=shard.group)
            st[k] = torch.cat(parts)
        state["state"][idx] = st
    return state


def shard_expert_optimizer_state(optimizer, root: torch.nn.Module, state: dict) -> dict:
    """A full (unsharded) optimizer state dict, with each expert parameter's state sliced to this rank's experts."""
    shards = _expert_shards(root)
    out = {**state, "state": dict(state["state"])}
    for idx, p in enumerate(_flat_params(optimizer)):
        shard = shards.get(id(p))
        st = out["state"].get(idx) if shard is not None else None
        if st is None or shard.per == shard.total:
            continue
        st = dict(st)
        for k, v in st.items():
            if (torch.is_tensor(v) and v.dim() == p.dim() and v.shape[0] == shard.total
                    and tuple(v.shape[1:]) == tuple(p.shape[1:])):
                st[k] = v[shard.first:shard.first + shard.per].clone()
        out["state"][idx] = st
    return out


def clip_grad_norm_expert_parallel_(parameters, max_norm: float, group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) over the *global* model of an expert-parallel run.

    Replicated parameters have the same gradient on every rank (after DDP's all-reduce);
    the squared norms of the sharded expert gradients are summed over ``group``. Every
    rank computes the same total norm and scales by the same factor. A collective.
    Returns the total norm.
    """
    grads_dense, grads_expert = [], []
    for p in parameters:
        if p.grad is None:
            continue
        (grads_expert if getattr(p, "_lmkit_expert_parallel", False) else grads_dense).append(p.grad)
    grads = grads_dense + grads_expert
    device = grads[0].device if grads else torch.device("cpu")

    def sq(gs):
        total = torch.zeros((), device=device, dtype=torch.float32)
        for g in gs:
            total = total + torch.linalg.vector_norm(g.detach(), 2).float().to(device).square()
        return total

    dense_sq, expert_sq = sq(grads_dense), sq(grads_expert)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(expert_sq, group=group)
    total = (dense_sq + expert_sq).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


class _Truncated:
    """An iterable that stops after ``n`` items of ``loader`` (used when a sampler cannot be cut)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name):
        if name == "loader":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


# --------------------------------------------------------------------------- strategy

class ExpertParallelStrategy(DDPStrategy):
    """Lightning DDP for a model whose MoE experts :func:`~lmkit_moe.parallel.apply_expert_parallel` sharded.

    See the module docstring: full-expert checkpoints (model and optimizer state), global
    gradient-norm clipping, equal validation batch counts on every rank.
    """

    strategy_name = "lmkit_expert_parallel"

    def setup(self, trainer) -> None:
        plugin = self.precision_plugin
        if not getattr(plugin, "_lmkit_ep_clip", False):
            def clip_grad_by_norm(plugin_self, optimizer, clip_val):
                clip_grad_norm_expert_parallel_(list(plugin_self.main_params(optimizer)), clip_val)

            plugin.clip_grad_by_norm = types.MethodType(clip_grad_by_norm, plugin)
            plugin._lmkit_ep_clip = True
        super().setup(trainer)

    # -- checkpoints: full experts on disk, shards in memory ---------------------------
    def lightning_module_state_dict(self) -> dict:
        return full_expert_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        load_full_expert_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def optimizer_state(self, optimizer) -> dict:
        return gather_expert_optimizer_state(optimizer, self.lightning_module)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        states = [shard_expert_optimizer_state(opt, self.lightning_module, st)
                  for opt, st in zip(self.optimizers, checkpoint["optimizer_states"])]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    # -- every rank must run the same number of forwards -------------------------------
    def process_dataloader(self, dataloader):
        dataloader = super().process_dataloader(dataloader)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return dataloader
        try:
            n = len(dataloader)
        except TypeError:
            return dataloader
        t = torch.tensor([n, -n], dtype=torch.long, device=self.root_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        most, least = int(t[0]), -int(t[1])
        if most == least:
            return dataloader
        sampler = getattr(dataloader, "batch_sampler", None)
        if isinstance(getattr(sampler, "batches", None), list):  # lmkit's SequentialBatchSampler
            sampler.batches = sampler.batches[:least]
            return dataloader
        return _Truncated(dataloader, least)


def build_expert_parallel(cfg: ExpertParallelConfig) -> StrategyPlan:
    """The ``expert_parallel`` strategy plan: :class:`ExpertParallelStrategy` + sharding in ``configure_model``."""
    strategy = ExpertParallelStrategy(
        process_group_backend=cfg.process_group_backend,
        find_unused_parameters=cfg.find_unused_parameters,
        timeout=timedelta(seconds=float(cfg.timeout_s)),
    )

    def parallelize(lm_module, run) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("strategy=expert_parallel: the process group is not initialized")
        layers = moe_layers(lm_module.model)
        if not layers:
            raise MoEConfigError(
                "strategy=expert_parallel shards mixture-of-experts layers, but the model has none: "
                "set model.moe.num_experts=N, or use strategy=ddp")
        world = dist.get_world_size()
        for _, layer in layers:  # the same on every rank: all raise before any collective
            _validate_world(layer.num_experts, world)
        apply_expert_parallel(lm_module.model)
        exclude_expert_params_from_ddp(lm_module)  # DDP wraps the LightningModule

    return StrategyPlan(strategy, parallelize=parallelize,
                        description="DDP with MoE experts sharded over the ranks (all-to-all token exchange)")


__all__ = ["ExpertParallelConfig", "ExpertParallelStrategy", "build_expert_parallel", "check_run",
           "clip_grad_norm_expert_parallel_", "gather_expert_optimizer_state", "planned_world_size",
           "shard_expert_optimizer_state"]
