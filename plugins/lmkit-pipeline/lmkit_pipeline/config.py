"""The ``strategy=pipeline`` settings and every check that can run before a process group exists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmkit.errors import ConfigError

#: config name -> (torch class name, placement style, stages per rank: None = any, int = exactly)
SCHEDULES: dict[str, tuple[str, str, int | None]] = {
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "1f1b": ("Schedule1F1B", "loop", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "looped_bfs": ("ScheduleLoopedBFS", "loop", None),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zbv_zero_bubble": ("ScheduleZBVZeroBubble", "v", 2),
    "dualpipev": ("ScheduleDualPipeV", "v", 2),
}
SINGLE_STAGE = {"gpipe", "1f1b"}
DP_MODES = ("replicate", "fsdp")


@dataclass
class PipelineConfig:
    """Pipeline parallelism over ``pp_size`` ranks (× ``dp_size`` data-parallel replicas).

    ``pp_size``: ranks in one pipeline. ``stages_per_rank``: stages each rank holds
    (1 for ``gpipe``/``1f1b``, ≥1 for the interleaved/looped schedules, 2 for the V schedules).
    ``schedule``: one of :data:`SCHEDULES`. ``n_microbatches``: pipeline micro-batches per
    optimizer step; the step's rows per replica (``data.batch_size × data.grad_accum``)
    must be divisible by it. ``split``: blocks per stage (a list of ``pp_size ×
    stages_per_rank`` positive ints summing to the model's block count), or null to cut the
    block stack balanced by parameter count. ``dp_size``: data-parallel replicas (null = world
    size / pp_size). ``dp_mode``: ``replicate`` (gradients all-reduced across replicas);
    ``fsdp`` (sharding inside stages) is refused with an explanation. The collective timeout is
    lmkit's ``trainer.dist_timeout_s`` (it applies to the pipeline's own process groups too).
    """

    name: str = "pipeline"
    pp_size: int = 2
    stages_per_rank: int = 1
    schedule: str = "1f1b"
    n_microbatches: int = 4
    split: Any = None  # list[int] | None
    dp_size: Any = None  # int | None
    dp_mode: str = "replicate"
    process_group_backend: Any = None  # None = gloo on CPU, nccl on GPU
    eval_microbatches: Any = None  # int | None: None = 1 (validation batches are not split)

    def __post_init__(self):
        if not isinstance(self.pp_size, int) or self.pp_size < 1:
            raise ConfigError(f"strategy.pp_size must be an int >= 1, got {self.pp_size!r}")
        if not isinstance(self.stages_per_rank, int) or self.stages_per_rank < 1:
            raise ConfigError(f"strategy.stages_per_rank must be an int >= 1, got {self.stages_per_rank!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown strategy.schedule '{self.schedule}'. Available: {', '.join(SCHEDULES)}.")
        _, style, spr = SCHEDULES[self.schedule]
        if spr is not None and self.stages_per_rank != spr:
            if spr == 1:
                hint = "use schedule=interleaved_1f1b (or looped_bfs, interleaved_zero_bubble) for several stages per rank"
            else:
                hint = f"the V-shaped schedule {self.schedule} places exactly {spr} stages on each rank"
            raise ConfigError(f"strategy.schedule={self.schedule} needs strategy.stages_per_rank={spr}, "
                              f"got {self.stages_per_rank}: {hint}.")
        if not isinstance(self.n_microbatches, int) or self.n_microbatches < 1:
            raise ConfigError(f"strategy.n_microbatches must be an int >= 1, got {self.n_microbatches!r}")
        if self.schedule in ("1f1b", "zbv_zero_bubble", "dualpipev") and self.n_microbatches < self.n_stages:
            raise ConfigError(f"strategy.schedule={self.schedule} needs at least one micro-batch per stage: "
                              f"n_microbatches={self.n_microbatches} < {self.n_stages} stages "
                              f"(pp_size {self.pp_size} × stages_per_rank {self.stages_per_rank}). Raise strategy.n_microbatches.")
        if self.schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
            rounds = max(1, self.n_microbatches // self.pp_size)
            if self.n_microbatches % rounds:
                raise ConfigError(f"strategy.schedule={self.schedule} needs n_microbatches to be a multiple of its rounds "
                                  f"(max(1, n_microbatches // pp_size) = {rounds}); got n_microbatches={self.n_microbatches}. "
                                  f"Use a multiple of pp_size={self.pp_size}.")
        if self.split is not None:
            split = list(self.split)
            if not all(isinstance(n, int) and n >= 1 for n in split):
                raise ConfigError(f"strategy.split must list a positive number of blocks per stage, got {split}")
            if len(split) != self.n_stages:
                raise ConfigError(f"strategy.split has {len(split)} entries but there are {self.n_stages} stages "
                                  f"(pp_size {self.pp_size} × stages_per_rank {self.stages_per_rank})")
            self.split = split
        if self.dp_size is not None and (not isinstance(self.dp_size, int) or self.dp_size < 1):
            raise ConfigError(f"strategy.dp_size must be null or an int >= 1, got {self.dp_size!r}")
        if self.dp_mode not in DP_MODES:
            raise ConfigError(f"strategy.dp_mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")
        if self.dp_mode == "fsdp":
            raise ConfigError(
                "strategy.dp_mode=fsdp (FSDP2 sharding inside pipeline stages) is not supported by lmkit-pipeline: "
                "use strategy.dp_mode=replicate (pipeline × data parallel, full stage copy per replica), or "
                "strategy=fsdp without pipelining when the model fits once sharded."
            )
        if self.eval_microbatches is not None and (not isinstance(self.eval_microbatches, int) or self.eval_microbatches < 1):
            raise ConfigError(f"strategy.eval_microbatches must be null or an int >= 1, got {self.eval_microbatches!r}")

    @property
    def n_stages(self) -> int:
        return self.pp_size * self.stages_per_rank

    @property
    def style(self) -> str:
        return SCHEDULES[self.schedule][1]

    def resolved_dp(self, world_size: int) -> int:
        """Data-parallel replicas for ``world_size`` processes; a ConfigError when they do not fit."""
        if world_size % self.pp_size:
            raise ConfigError(f"strategy.pp_size={self.pp_size} does not divide the {world_size} processes of this run "
                              f"(trainer.devices × trainer.num_nodes). Launch pp_size × dp_size processes.")
        dp = world_size // self.pp_size
        if self.dp_size is not None and self.dp_size != dp:
            raise ConfigError(f"strategy.pp_size={self.pp_size} × strategy.dp_size={self.dp_size} = "
                              f"{self.pp_size * self.dp_size} processes, but the run has {world_size} "
                              f"(trainer.devices × trainer.num_nodes). Set strategy.dp_size=null to derive it.")
        return dp


def stage_ranks(n_stages: int, pp_size: int, style: str) -> list[int]:
    """Pipeline rank of every stage: ``loop`` puts stage s on rank s % pp; ``v`` goes down then back up."""
    if style == "v":
        return [s if s < pp_size else 2 * pp_size - 1 - s for s in range(n_stages)]
    return [s % pp_size for s in range(n_stages)]


def check_run(cfg: PipelineConfig, *, kind: str | None, n_blocks: int, rows_per_step: int | None = None,
              batch_ramp_steps: int = 0, precision: str | None = None, compile: bool = False,
              world_size: int | None = None) -> None:
    """Everything that makes a pipeline run impossible, checked from the config and the built model."""
    if kind == "encoder_decoder":
        raise ConfigError(
            "strategy=pipeline supports decoder-only and encoder-only architectures; this model is an "
            "encoder_decoder (its decoder blocks read the encoder output, which a linear stage pipeline does not carry). "
            "Use strategy=ddp or strategy=fsdp for encoder–decoder models."
        )
    if n_blocks < cfg.n_stages:
        raise ConfigError(
            f"strategy=pipeline needs at least one transformer block per stage: pp_size {cfg.pp_size} × "
            f"stages_per_rank {cfg.stages_per_rank} = {cfg.n_stages} stages, but the model has {n_blocks} blocks. "
            f"Lower strategy.pp_size / strategy.stages_per_rank or use a deeper model."
        )
    if cfg.split is not None and sum(cfg.split) != n_blocks:
        raise ConfigError(f"strategy.split={cfg.split} assigns {sum(cfg.split)} blocks, but the model has {n_blocks}")
    if rows_per_step is not None and rows_per_step % cfg.n_microbatches:
        divisors = [d for d in range(1, rows_per_step + 1) if rows_per_step % d == 0]
        raise ConfigError(
            f"strategy.n_microbatches={cfg.n_microbatches} does not divide the {rows_per_step} rows of one step "
            f"(data.batch_size × data.grad_accum per data-parallel replica). Choose n_microbatches among "
            f"{divisors} or change data.batch_size / data.grad_accum."
        )
    if batch_ramp_steps:
        raise ConfigError("strategy=pipeline needs the same batch shape every step; data.batch_ramp_steps must be 0")
    if precision is not None and str(precision) == "16-mixed":
        raise ConfigError("strategy=pipeline does not support trainer.precision=16-mixed (its loss scaler does not see "
                          "the pipeline's backward); use bf16-mixed or 32")
    if compile:
        raise ConfigError("strategy=pipeline runs the model stage by stage; model.compile=true is not supported with it")
    if world_size is not None:
        cfg.resolved_dp(world_size)
