"""lmkit plugin entry point of the ``lmkit-pipeline`` distribution (entry-point group ``lmkit``).

Registers the ``pipeline`` strategy and its config file, and checks at model build time —
before any process group exists — that the run can be pipelined.
"""
from __future__ import annotations

from pathlib import Path

from lmkit.plugins import hookimpl
from lmkit.registry import Component


@hookimpl
def lmkit_register_strategies():
    from lmkit_pipeline.config import PipelineConfig
    from lmkit_pipeline.strategy import build_pipeline

    return [Component("pipeline", build_pipeline, PipelineConfig,
                      "pipeline parallelism (torch.distributed.pipelining: GPipe, 1F1B, interleaved, zero-bubble) × data parallel")]


@hookimpl
def lmkit_config_dirs():
    return [str(Path(__file__).parent / "conf")]


@hookimpl(trylast=True)  # after other plugins changed the model (e.g. MoE layers)
def lmkit_configure_model(model, run):
    """Refuse a run that cannot be pipelined while it is still a config error (no process group yet)."""
    from lmkit_pipeline.config import PipelineConfig, check_run

    cfg = getattr(run, "strategy", None)
    if not isinstance(cfg, PipelineConfig):
        return
    data, trainer = run.data, run.trainer
    devices, nodes = trainer.devices, trainer.num_nodes
    world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) and devices > 0 else None
    check_run(cfg, kind=getattr(model, "kind", None), n_blocks=len(model.transformer_blocks()),
              rows_per_step=data.batch_size * data.grad_accum, batch_ramp_steps=data.batch_ramp_steps,
              precision=trainer.precision, compile=bool(getattr(run.model, "compile", False)), world_size=world)
