"""The Lightning strategy of ``strategy=pipeline`` and the plan that wires it into lmkit.

Lightning has no pipeline parallelism. :class:`PipelineStrategy` is a ``DDPStrategy``
(process launch, process group, device placement, collectives for logging and callbacks)
that does *not* wrap the module in ``DistributedDataParallel``: the pipeline runtime
reduces gradients itself (tied parameters across pipeline ranks, then data-parallel
replicas). It also

* shards the data by data-parallel replica (``distributed_sampler_kwargs``), so all ranks of
  one pipeline read the same batches;
* clips gradients by the norm over all stages;
* saves one whole-model checkpoint (the stages' parts gathered on global rank 0, in the
  single-process format) and, on resume, hands every rank its part.
"""
from __future__ import annotations

from typing import Any, Mapping

from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from lmkit.strategies import StrategyPlan
from lmkit_pipeline.config import PipelineConfig
from lmkit_pipeline.runtime import PipelineRuntime


class PipelineStrategy(DDPStrategy):
    """DDP-style processes without the DDP wrapper; the stages and schedule live in :attr:`runtime`."""

    strategy_name = "lmkit_pipeline"

    def __init__(self, runtime: PipelineRuntime, process_group_backend: str | None = None):
        # the collective timeout is lmkit's trainer.dist_timeout_s (set on the strategy by the core)
        super().__init__(process_group_backend=process_group_backend)
        self.runtime = runtime

    # -- processes and data -------------------------------------------------------------
    def _world(self) -> int:
        return self.num_nodes * self.num_processes

    def setup_environment(self) -> None:
        self.runtime.cfg.resolved_dp(self._world())  # a ConfigError before any process group exists
        super().setup_environment()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.runtime.cfg.resolved_dp(self._world())
        return {"num_replicas": dp, "rank": self.global_rank % dp}

    def configure_ddp(self) -> None:
        """No DDP wrapper: gradients are reduced by the pipeline runtime."""

    def setup(self, trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        runtime = self.runtime

        def clip_grad_by_norm(optimizer, clip_val):
            runtime.clip_grad_norm_(float(clip_val))

        self.precision_plugin.clip_grad_by_norm = clip_grad_by_norm

    # -- checkpoints ----------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        local = self.lightning_module.state_dict()
        return self.runtime.full_state_dict(local) if self.runtime.ready else local

    def optimizer_state(self, optimizer) -> dict:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return self.runtime.full_optimizer_state(optimizer) if self.runtime.ready else optimizer.state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self.runtime.ready:
            return super().load_model_state_dict(checkpoint, strict=strict)
        self.runtime.load_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer._optimizer
            self.runtime.load_optimizer_state(optimizer, state)
        _optimizers_to_device(self.optimizers, self.root_device)


def build_pipeline(cfg: PipelineConfig) -> StrategyPlan:
    """The ``pipeline`` strategy component: factory(cfg) -> StrategyPlan."""
    runtime = PipelineRuntime(cfg)

    return StrategyPlan(
        strategy=PipelineStrategy(runtime, cfg.process_group_backend),
        parallelize=runtime.setup,
        forward_backward=runtime.forward_backward,
        evaluate=runtime.evaluate,
        atomic_checkpoints=True,
        description=f"pipeline: {cfg.pp_size} ranks × {cfg.stages_per_rank} stages, {cfg.schedule}",
    )
