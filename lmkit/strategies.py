"""Parallelism strategy plans: a Lightning strategy plus an optional from-outside ``parallelize``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class StrategyPlan:
    """What a strategy plugin returns.

    ``strategy``: a Lightning strategy object or name. ``parallelize(model, cfg, device_mesh)``,
    when given, is applied to the architecture inside ``LightningModule.configure_model``
    (e.g. FSDP2 ``fully_shard`` per block, DTensor tensor parallel), so model code stays
    plain. ``forward_backward(lm_module, micro_batches) -> (loss_sum, n_targets)``, when
    given, replaces the module's own forward/backward over a step's micro-batches (a
    pipeline schedule drives it); ``evaluate(lm_module, batch) -> LossOutput`` likewise for
    validation. ``atomic_checkpoints``: False where the strategy writes its own (sharded)
    checkpoint format.
    """

    strategy: Any = "auto"
    parallelize: Callable | None = None
    forward_backward: Callable | None = None
    evaluate: Callable | None = None
    atomic_checkpoints: bool = True
    description: str = ""


def build_auto(cfg) -> StrategyPlan:
    return StrategyPlan("auto")


def build_ddp(cfg) -> StrategyPlan:
    from lightning.pytorch.strategies import DDPStrategy

    return StrategyPlan(DDPStrategy(process_group_backend=cfg.process_group_backend,
                                    find_unused_parameters=cfg.find_unused_parameters))


def data_parallel_world(trainer) -> tuple[int, int]:
    """(rank, size) among the data-parallel replicas of ``trainer``'s run.

    Tensor-parallel peers and the stages of one pipeline read the same batches, so they count
    as one replica; strategies that have such dimensions say so in
    ``distributed_sampler_kwargs`` (Lightning's ModelParallelStrategy, lmkit-pipeline).
    """
    if trainer is None:
        return 0, 1
    try:
        kwargs = trainer.strategy.distributed_sampler_kwargs
    except (AttributeError, RuntimeError):
        kwargs = None
    if kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size
