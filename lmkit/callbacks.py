"""Built-in Lightning callbacks."""
from __future__ import annotations

import time

import lightning as L

from lmkit.strategies import data_parallel_world


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: the step's input tokens, over all data-parallel replicas, per second.

    Ranks that share a replica's batches (tensor-parallel peers, the stages of a pipeline)
    count once.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = getattr(pl_module, "_last_step_tokens", 0)
        elapsed = time.perf_counter() - self._t0
        if tokens and elapsed > 0:
            replicas = data_parallel_world(trainer)[1]
            pl_module.log("train/tokens_per_s", tokens * replicas / elapsed, prog_bar=True)


def build_token_throughput(cfg) -> L.Callback:
    return TokenThroughput()


def build_lr_monitor(cfg) -> L.Callback:
    from lightning.pytorch.callbacks import LearningRateMonitor

    return LearningRateMonitor(logging_interval="step")
