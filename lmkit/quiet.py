"""Lightning's messages that do not apply to lmkit runs, silenced one by one (each with the reason).

Only exact messages are filtered, so everything else Lightning says still reaches the user.
"""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar

# (message prefix, why it does not apply)
_IGNORED_WARNINGS = (
    # lmkit's optimizer step is manual and checkpoints are saved after it on purpose: a
    # checkpoint holds the state after step N, which is what exact resume continues from
    ("Using ModelCheckpoint with manual optimization", "post-step checkpoints are lmkit's design"),
    # val/loss, val/ppl and val/bpb come from torchmetrics SumMetrics, synced across ranks by
    # compute(); Lightning cannot see that and asks for sync_dist on the already-synced values
    ("It is recommended to use `self.log('val/loss'", "already synced"),
    ("It is recommended to use `self.log('val/ppl'", "already synced"),
    ("It is recommended to use `self.log('val/bpb'", "already synced"),
    # data=litdata: litdata's StreamingDataset gives each rank and worker its own chunks, so its length is exact
    ("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading",
     "litdata assigns every worker its own chunks"),
)
_IGNORED_INFO = ("💡 Tip: For seamless cloud logging",)  # an advertisement printed by every Trainer


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_IGNORED_INFO)


def quiet_lightning() -> None:
    """Install the filters (idempotent)."""
    for prefix, _why in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=_escape(prefix) + ".*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropInfo) for f in log.filters):
            log.addFilter(_DropInfo())


def _escape(prefix: str) -> str:
    import re

    return re.escape(prefix)


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num`` (the logger's version, "logs" for lmkit's CSV log)."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
