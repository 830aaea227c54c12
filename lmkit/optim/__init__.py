"""Optimizers and LR schedules; :class:`OptimizerConfigBase` is the base of optimizer configs."""
from lmkit.optim.base import OptimizerConfigBase

__all__ = ["OptimizerConfigBase"]
