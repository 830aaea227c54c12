"""Weight initialization schemes, applied to a built model from outside."""
from __future__ import annotations

import math

from torch import nn

INIT_SCHEMES = ("normal", "xavier")


def initialize(model: nn.Module, scheme: str, std: float, n_layer: int, residual_names=("proj.weight",)) -> None:
    """Initialize ``model`` in place.

    ``normal``: GPT-2's N(0, std) for linear and embedding weights, zero biases, and
    residual output projections (parameters whose name ends in one of ``residual_names``)
    scaled by 1/sqrt(2·n_layer). ``xavier``: Xavier-uniform linear weights, N(0, std)
    embeddings. Norm layers keep weight 1, bias 0.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
    if scheme == "normal":
        scaled_std = std / math.sqrt(2 * n_layer)
        for name, param in model.named_parameters():
            if any(name.endswith(r) for r in residual_names) and param.dim() == 2:
                nn.init.normal_(param, mean=0.0, std=scaled_std)
