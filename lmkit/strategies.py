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
    plain. ``manual_step``: the strategy drives forward/backward itself (pipelining).
    """

    strategy: Any = "auto"
    parallelize: Callable | None = None
    description: str = ""


def build_auto(cfg) -> StrategyPlan:
    return StrategyPlan("auto")


def build_ddp(cfg) -> StrategyPlan:
    from lightning.pytorch.strategies import DDPStrategy

    return StrategyPlan(DDPStrategy(process_group_backend=cfg.process_group_backend,
                                    find_unused_parameters=cfg.find_unused_parameters))
