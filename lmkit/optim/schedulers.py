"""Learning-rate schedules, stepped once per optimizer step: warmup, then cosine/linear/constant;
T5's inverse square root (constant, then 1/sqrt(step))."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR

from lmkit.errors import ConfigError


@dataclass
class SchedulerConfig:
    """``warmup_steps`` of linear warmup from 0, then decay to ``min_lr_ratio · lr`` at the last step."""

    name: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None  # default: the run's total steps

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_steps is not None and (isinstance(self.decay_steps, bool) or self.decay_steps < 1):
            raise ConfigError(f"scheduler.decay_steps must be >= 1 or null (the run's trainer.max_steps), "
                              f"got {self.decay_steps}")


class WarmupDecay:
    """LR multiplier at step ``s``: linear warmup, then ``shape`` decay to ``floor``; picklable."""

    def __init__(self, shape: str, warmup: int, total: int, floor: float):
        self.shape, self.warmup, self.total, self.floor = shape, warmup, max(total, warmup + 1), floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.shape == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        if self.shape == "cosine":
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - self.floor) * progress


def _build(shape):
    def build(optimizer, cfg: SchedulerConfig, total_steps: int):
        return LambdaLR(optimizer, WarmupDecay(shape, cfg.warmup_steps, cfg.decay_steps or total_steps, cfg.min_lr_ratio))

    build.__doc__ = f"Linear warmup then {shape} schedule."
    return build


build_cosine = _build("cosine")
build_linear = _build("linear")
build_constant = _build("constant")


@dataclass
class InverseSqrtConfig:
    """T5's inverse square root schedule: ``optimizer.lr`` for the first ``warmup_steps`` steps, then ∝ 1/√n.

    The learning rate of step ``n`` (0 = the first update) is
    ``optimizer.lr · √(warmup_steps / max(n, warmup_steps))``. With ``optimizer.lr =
    1/√warmup_steps`` that is T5's ``1/√max(n, k)`` exactly (k = 10⁴: 0.01 until step 10⁴).
    """

    name: str = "inverse_sqrt"
    warmup_steps: int = 10_000

    def __post_init__(self):
        from lmkit.config.checks import check_int

        check_int("scheduler.warmup_steps", self.warmup_steps, minimum=1,
                  hint=" (the inverse square root schedule holds optimizer.lr for this many steps, then decays as "
                       "1/sqrt(step); T5: 10000)")


class InverseSqrt:
    """LR multiplier ``√(k / max(n, k))`` at step ``n``; picklable."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return math.sqrt(self.warmup / max(step, self.warmup))


def build_inverse_sqrt(optimizer, cfg: InverseSqrtConfig, total_steps: int):
    """T5's 1/√max(n, k) schedule, scaled so that its constant phase is ``optimizer.lr``."""
    return LambdaLR(optimizer, InverseSqrt(cfg.warmup_steps))
