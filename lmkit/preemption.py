"""Preemption: SIGTERM or SIGUSR1 saves a checkpoint at the end of the current step, then exits.

Built on Lightning's own SIGTERM handling (2.x): Lightning's handler sets
``trainer.received_sigterm`` (and, with several ranks, broadcasts it so that every rank
stops at the same step); its loops then raise ``SIGTERMException`` once the current step
is done. This callback adds three things:

* SIGUSR1 (what SLURM sends before a time limit or preemption, with ``--signal=USR1@90``)
  is routed to the same handler; a SIGUSR1 handler that was already there (Lightning's
  SLURM auto-requeue) still runs first;
* on ``SIGTERMException`` while fitting, the checkpoint callback saves ``stepNNNNNN.ckpt``
  and ``last.ckpt`` for the step just finished, through the same code path as periodic
  checkpoints (keep-last-k and atomic writes included), on every rank;
* it records what happened (``info``) so that :func:`lmkit.train.train` can report it and
  the CLI can print how to resume and exit with :data:`EXIT_PREEMPTED`.

Lightning restores the previous signal handlers when a ``fit``/``validate`` call ends.
"""
from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_PREEMPTED = 3  # the CLI's exit status after a signal: checkpoint saved, resume to continue
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(L.Callback):
    """Saves a checkpoint when the run is stopped by SIGTERM/SIGUSR1 (see the module docstring)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.info: dict | None = None  # {"signal", "step", "checkpoint"} once preempted

    # -- signals ----------------------------------------------------------------
    def _install(self) -> None:
        """Route SIGTERM and SIGUSR1 to Lightning's SIGTERM handler, remembering which one came."""
        if threading.current_thread() is not threading.main_thread():
            return
        lightning_sigterm = signal.getsignal(signal.SIGTERM)  # registered by the Trainer just before its loops
        previous_usr1 = signal.getsignal(signal.SIGUSR1)
        if getattr(lightning_sigterm, "_lmkit_preemption", False):
            return

        def handler(signum, frame):
            if self.signal_name is None:
                self.signal_name = signal.Signals(signum).name
            if signum == signal.SIGUSR1 and callable(previous_usr1):
                previous_usr1(signum, frame)
            if callable(lightning_sigterm):
                lightning_sigterm(signal.SIGTERM, frame)

        handler._lmkit_preemption = True
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, handler)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._install()

    # -- saving -----------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        name = self.signal_name or "SIGTERM"
        self.info = {"signal": name, "step": trainer.global_step, "checkpoint": None}
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return  # nothing trained yet: nothing worth saving
        self.info["checkpoint"] = save_now(trainer)


def save_now(trainer) -> str:
    """Checkpoint the current step through the ModelCheckpoint callback (on every rank); return last.ckpt's path."""
    mc = trainer.checkpoint_callback
    if isinstance(mc, ModelCheckpoint) and hasattr(mc, "_save_last_checkpoint"):
        if mc._last_global_step_saved != trainer.global_step:  # not already saved for this step
            candidates = mc._monitor_candidates(trainer)
            mc._save_topk_checkpoint(trainer, candidates)
            mc._save_last_checkpoint(trainer, candidates)
        if mc.last_model_path:
            return mc.last_model_path
    path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(str(path))
    return str(path)


def resume_hint(run_dir, argv: list[str] | None = None) -> str:
    """The command line that resumes ``run_dir``: the same overrides with ``resume=RUN_DIR``
    (unchanged with ``resume=auto``, which finds the run directory's checkpoints itself)."""
    argv = list(argv or [])
    is_resume = [a.split("=", 1)[0].lstrip("+~") == "resume" for a in argv]
    if "resume=auto" in [a.lstrip("+~") for a in argv]:
        return " ".join(["python -m lmkit", *(shlex.quote(a) for a in argv)])
    kept = [a for a, r in zip(argv, is_resume) if not r]
    return " ".join(["python -m lmkit", *(shlex.quote(a) for a in kept), shlex.quote(f"resume={run_dir}")])
