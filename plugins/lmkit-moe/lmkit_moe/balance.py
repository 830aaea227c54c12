"""``callbacks=[...,moe_balance]``: an end-of-training summary of how evenly the routers spread tokens.

Per MoE layer, the callback counts the (non-padding) assignments the router sends to each
expert in every training forward (before capacity, summed over ranks) and, when training
ends, reports the **max/min expert load ratio** (1.0 = perfectly even; ``inf`` when an
expert got nothing) and the max/mean ratio (``E`` = collapse onto one expert), over the
last ``window`` steps and over the whole run. The numbers are printed on rank 0, logged
as ``moe_balance/...`` to the run's loggers, and kept in ``callback.summary``.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist

from lmkit_moe.layer import moe_layers


def load_ratios(counts: torch.Tensor) -> tuple[float, float]:
    """(max/min, max/mean) of per-expert counts; max/min is ``inf`` when an expert got nothing."""
    counts = counts.double()
    if counts.numel() == 0 or float(counts.sum()) == 0:
        return float("nan"), float("nan")
    lo, hi, mean = float(counts.min()), float(counts.max()), float(counts.mean())
    return (hi / lo if lo > 0 else math.inf), hi / mean


class MoEBalance(L.Callback):
    """Expert-load summary at the end of training (see the module docstring)."""

    def __init__(self, window: int = 50, verbose: bool = True):
        self.window, self.verbose = window, verbose
        self.summary: dict[str, float] = {}
        self._hooks = []
        self._names: list[str] = []

    def on_train_start(self, trainer, pl_module):
        root = getattr(pl_module, "model", pl_module)
        self._names = [name for name, _ in moe_layers(root)]
        self._step = None
        self._total = None
        self._recent: deque = deque(maxlen=max(1, self.window))
        for i, (_, layer) in enumerate(moe_layers(root)):
            self._hooks.append(layer.register_forward_hook(self._counter(i)))

    def _counter(self, i: int):
        def hook(module, args, output):
            last = getattr(module, "_last", None)
            if not module.training or not last:
                return
            routed = last["routed"].detach().to(torch.float64)
            if self._step is None:
                self._step = [None] * len(self._names)
            self._step[i] = routed if self._step[i] is None else self._step[i] + routed
        return hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is None:
            return
        step = [c for c in self._step if c is not None]
        if len(step) == len(self._names):
            stacked = torch.stack(step)            # [layers, experts]
            self._recent.append(stacked)
            self._total = stacked.clone() if self._total is None else self._total + stacked
        self._step = None

    def on_train_end(self, trainer, pl_module):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self._names:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total = self._total
        recent = torch.stack(list(self._recent)).sum(0) if self._recent else None
        if world > 1:  # a collective: every rank gets here (on_train_end)
            device = total.device if total is not None else pl_module.device
            have = torch.tensor([0.0 if total is None else 1.0], device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if float(have) == 0:
                return
            total, recent = total.clone(), recent.clone()
            dist.all_reduce(total)
            dist.all_reduce(recent)
        elif total is None:
            return
        summary: dict[str, float] = {}
        worst_recent, worst_total, mean_recent = 0.0, 0.0, []
        for name, rec, tot in zip(self._names, recent, total):
            r_mm, r_mean = load_ratios(rec)
            t_mm, _ = load_ratios(tot)
            summary[f"moe_balance/{name}/max_min_ratio"] = r_mm
            summary[f"moe_balance/{name}/max_mean_ratio"] = r_mean
            worst_recent, worst_total = max(worst_recent, r_mm), max(worst_total, t_mm)
            mean_recent.append(r_mm)
        summary["moe_balance/max_min_ratio"] = worst_recent          # worst layer, last `window` steps
        summary["moe_balance/max_min_ratio_mean"] = sum(mean_recent) / len(mean_recent)
        summary["moe_balance/max_min_ratio_run"] = worst_total       # worst layer, whole run
        steps = len(self._recent)
        self.summary = summary
        pl_module.moe_balance = summary
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
        if self.verbose:
            per_layer = ", ".join(f"{n} {summary[f'moe_balance/{n}/max_min_ratio']:.2f}" for n in self._names)
            print(f"lmkit-moe: expert load max/min over the last {steps} steps: {per_layer} "
                  f"(worst {worst_recent:.2f}; whole run worst {worst_total:.2f})", flush=True)


@dataclass
class MoEBalanceConfig:
    """Options of ``moe_balance`` (``+callback_options.moe_balance.window=100``).

    ``window``: the recent steps the "last steps" ratios cover. ``verbose``: print the
    per-layer summary on rank 0 at the end of training.
    """

    window: int = 50
    verbose: bool = True

    def __post_init__(self):
        if self.window < 1:
            from lmkit.errors import ConfigError

            raise ConfigError(f"callback_options.moe_balance.window must be >= 1, got {self.window}")


def build_moe_balance(cfg: MoEBalanceConfig | None) -> MoEBalance:
    cfg = cfg or MoEBalanceConfig()
    return MoEBalance(window=cfg.window, verbose=cfg.verbose)


__all__ = ["MoEBalance", "MoEBalanceConfig", "build_moe_balance", "load_ratios"]
