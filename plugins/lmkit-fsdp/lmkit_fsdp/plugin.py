"""lmkit plugin entry point of the ``lmkit-fsdp`` distribution (entry-point group ``lmkit``).

Registers, through the same hooks as any third-party package:

* strategies ``fsdp`` (FSDP2 ``fully_shard`` per block and at the root) and ``fsdp_tp``
  (tensor parallelism inside groups of ranks, FSDP2 across them), both driven by
  Lightning's ``ModelParallelStrategy``;
* its config directory (``conf/strategy/fsdp.yaml``, ``conf/strategy/fsdp_tp.yaml``);
* a model check (``lmkit_configure_model``) that refuses, before any process group exists,
  a tensor-parallel size the architecture cannot be split by, an architecture without a
  tensor-parallel plan, or a device count that does not fit the mesh.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from lmkit.plugins import hookimpl
from lmkit.registry import Component
from lmkit.strategies import StrategyPlan

from lmkit_fsdp.config import FSDPConfig, FSDPTPConfig

STRATEGY_NAMES = ("fsdp", "fsdp_tp")


def build_fsdp(cfg: FSDPConfig) -> StrategyPlan:
    """Strategy factory of ``fsdp`` and ``fsdp_tp``."""
    from lmkit_fsdp.parallelize import parallelize
    from lmkit_fsdp.strategy import LmkitModelParallelStrategy

    strategy = LmkitModelParallelStrategy(cfg)
    return StrategyPlan(
        strategy=strategy,
        parallelize=partial(parallelize, cfg=cfg, strategy=strategy),
        # sharded checkpoints are written by the strategy (atomically); single files through lmkit's atomic IO
        atomic_checkpoints=not cfg.save_distributed_checkpoint,
        description=f"{cfg.name}: FSDP2" + (f" x TP{cfg.tp}" if cfg.tp > 1 else ""),
    )


@hookimpl
def lmkit_register_strategies():
    return [
        Component("fsdp", build_fsdp, FSDPConfig,
                  "FSDP2 fully_shard per block + root (ModelParallelStrategy; CPU/gloo and GPU)"),
        Component("fsdp_tp", build_fsdp, FSDPTPConfig,
                  "2-D: Megatron tensor parallelism (DTensor) inside groups, FSDP2 across them"),
    ]


@hookimpl
def lmkit_config_dirs():
    return [str(Path(__file__).resolve().parent / "conf")]


@hookimpl(trylast=True)  # after other plugins changed the model (e.g. MoE layers)
def lmkit_configure_model(model, run):
    scfg = getattr(run, "strategy", None)
    if not isinstance(scfg, FSDPConfig):
        return
    from lmkit_fsdp.strategy import check_world

    check_world(scfg, run.trainer.devices, run.trainer.num_nodes)
    if scfg.tp > 1:
        from lmkit_fsdp.families import plan_for

        plan_for(model, scfg.tp, getattr(run.model, "name", None))
