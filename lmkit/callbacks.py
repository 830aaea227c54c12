"""Built-in Lightning callbacks.

Enabled by name (``callbacks=[token_throughput,lr_monitor]``); their options are set under
``callback_options.<name>`` (``+callback_options.lr_monitor.logging_interval=epoch``),
validated against the dataclasses below, and handed to the factories.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import lightning as L

from lmkit.errors import ConfigError
from lmkit.strategies import data_parallel_world


@dataclass
class TokenThroughputConfig:
    """Options of ``token_throughput``.

    ``window``: steps the rate is averaged over (tokens of the last ``window`` steps over
    their summed time; 1 = each step alone). ``prog_bar``: show the rate in the progress bar.
    """

    window: int = 1
    prog_bar: bool = True

    def __post_init__(self):
        if self.window < 1:
            raise ConfigError(f"callback_options.token_throughput.window must be >= 1, got {self.window}")


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: the step's input tokens, over all data-parallel replicas, per second.

    Reads :attr:`lmkit.module.LMModule.last_step_tokens`. Ranks that share a replica's
    batches (tensor-parallel peers, the stages of a pipeline) count once.
    """

    def __init__(self, cfg: TokenThroughputConfig | None = None):
        self.cfg = cfg or TokenThroughputConfig()
        self._recent: deque = deque(maxlen=self.cfg.window)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = getattr(pl_module, "last_step_tokens", 0)
        elapsed = time.perf_counter() - self._t0
        if tokens and elapsed > 0:
            self._recent.append((tokens, elapsed))
            total_tokens = sum(t for t, _ in self._recent)
            total_time = sum(e for _, e in self._recent)
            replicas = data_parallel_world(trainer)[1]
            pl_module.log("train/tokens_per_s", total_tokens * replicas / total_time, prog_bar=self.cfg.prog_bar)


def build_token_throughput(cfg: TokenThroughputConfig | None) -> L.Callback:
    return TokenThroughput(cfg)


def build_compute_accounting(cfg) -> L.Callback:
    """``compute_accounting``: FLOPs, tokens, MFU, energy and CO2e (:mod:`lmkit.accounting.callback`)."""
    from lmkit.accounting.callback import ComputeAccounting

    return ComputeAccounting(cfg)


LR_INTERVALS = ("step", "epoch")


@dataclass
class LRMonitorConfig:
    """Options of ``lr_monitor`` (Lightning's ``LearningRateMonitor``)."""

    logging_interval: str = "step"  # step | epoch
    log_momentum: bool = False
    log_weight_decay: bool = False

    def __post_init__(self):
        if self.logging_interval not in LR_INTERVALS:
            raise ConfigError(f"callback_options.lr_monitor.logging_interval must be one of "
                              f"{', '.join(LR_INTERVALS)}, got {self.logging_interval!r}")


def build_lr_monitor(cfg: LRMonitorConfig | None) -> L.Callback:
    from lightning.pytorch.callbacks import LearningRateMonitor

    cfg = cfg or LRMonitorConfig()
    return LearningRateMonitor(logging_interval=cfg.logging_interval, log_momentum=cfg.log_momentum,
                               log_weight_decay=cfg.log_weight_decay)
