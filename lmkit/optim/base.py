"""The optimizer config contract, torch-free so that config validation can import it cheaply."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lmkit.errors import ConfigError


@dataclass
class OptimizerConfigBase:
    """Base of optimizer config dataclasses: the fields the core reads.

    ``weight_decay`` is read by the core (with ``getattr``, 0.0 when absent) to build the
    param groups handed to the optimizer factory: ``[{"params": [...], "weight_decay":
    weight_decay}, {"params": [...], "weight_decay": 0.0}]``, the second group holding
    biases, norms and embeddings (:func:`lmkit.models.base.no_weight_decay`) and every
    parameter of fewer than 2 dimensions. A factory that passes ``weight_decay=cfg.weight_decay``
    to its optimizer as the default is still right: per-group values take precedence.
    ``lr`` is the peak learning rate (the factory hands it to the optimizer; LR schedules
    scale the optimizer's groups from there). Subclass it and add the optimizer's own options::

        @dataclass
        class LionConfig(OptimizerConfigBase):
            name: str = "lion"
            lr: float = 1e-4
            betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """

    name: str = ""
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if not math.isfinite(self.lr):  # lr=inf trains to NaN at the first step
            raise ConfigError(f"optimizer.lr must be a finite number, got {self.lr}")
        if not math.isfinite(self.weight_decay):
            raise ConfigError(f"optimizer.weight_decay must be a finite number, got {self.weight_decay}")
