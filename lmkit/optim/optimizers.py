"""Built-in optimizers: SGD with momentum, Adam, AdamW, Adafactor."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmkit.errors import ConfigError
from lmkit.optim.base import OptimizerConfigBase


@dataclass
class OptimizerConfig(OptimizerConfigBase):
    """Options shared by the built-in optimizers (each uses the ones that apply to it)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    # Adafactor: relative step / factored second moments are torch's defaults
    beta2_decay: float = -0.8
    foreach: bool | None = None
    fused: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        from lmkit.config.checks import check_finite, check_positive, check_range

        check_positive("optimizer.eps", self.eps, " (added to the denominator for stability, e.g. 1e-8)")
        check_range("optimizer.momentum", self.momentum, 0.0, 1.0, high_open=True,
                    hint=" (SGD's momentum, e.g. 0.9; 0 = plain SGD)")
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0 (e.g. 0.9)")
        check_finite("optimizer.beta2_decay", self.beta2_decay)
        if self.beta2_decay > 0:
            raise ConfigError(f"optimizer.beta2_decay must be <= 0 (Adafactor's decay-rate exponent, e.g. -0.8), "
                              f"got {self.beta2_decay}")


def _fast_kwargs(cfg: OptimizerConfig) -> dict:
    """foreach/fused flags: fused when asked (CPU and CUDA kernels exist for Adam/AdamW/SGD)."""
    kwargs = {}
    if cfg.fused:
        kwargs["fused"] = True
    elif cfg.foreach is not None:
        kwargs["foreach"] = cfg.foreach
    return kwargs


def build_sgd(param_groups, cfg: OptimizerConfig):
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **_fast_kwargs(cfg))


def build_adam(param_groups, cfg: OptimizerConfig):
    """Adam with L2-style weight decay (added to the gradient), as in Kingma & Ba."""
    return torch.optim.Adam(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, **_fast_kwargs(cfg))


def build_adamw(param_groups, cfg: OptimizerConfig):
    """AdamW: decoupled weight decay (Loshchilov & Hutter), skipped for biases, norms and embeddings."""
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **_fast_kwargs(cfg))


def build_adafactor(param_groups, cfg: OptimizerConfig):
    """Adafactor (torch.optim.Adafactor): factored row/column second moments, no first moment."""
    if not hasattr(torch.optim, "Adafactor"):
        raise ConfigError("optimizer=adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
    return torch.optim.Adafactor(param_groups, lr=cfg.lr, beta2_decay=cfg.beta2_decay,
                                 weight_decay=cfg.weight_decay, foreach=cfg.foreach)
