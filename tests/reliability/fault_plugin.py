"""A test-only lmkit plugin that injects faults, installed as distribution ``lmkit-faults``.

Each fault is a callback enabled by name (``callbacks=[fault_slow,fault_nan]``) and set up
through environment variables, so the same command line works in a subprocess, under
torchrun, and in-process:

* ``fault_slow``: sleep ``LMKIT_FAULT_SLEEP`` seconds after each training step, so that a
  test can signal or kill the run at a step of its choosing.
* ``fault_nan``: the loss of batches ``LMKIT_FAULT_NAN_STEPS`` (comma-separated data
  steps) and of every batch from ``LMKIT_FAULT_NAN_FROM`` on is NaN (the gradients too).
  With ``LMKIT_FAULT_BATCH_LOG`` set, appends ``data_step sha1(input_ids)`` per batch.
* ``fault_rank``: rank ``LMKIT_FAULT_RANK`` dies (exit 13) or hangs at the start of a data
  step, following ``LMKIT_FAULT_PLAN``: one ``MODE@STEP`` per torchrun attempt
  (``TORCHELASTIC_RESTART_COUNT``), e.g. ``hang@3,die@5``; later attempts run clean.
* ``fault_slow_save``: every checkpoint write pauses ``LMKIT_FAULT_SAVE_PAUSE`` seconds
  half-way through writing its bytes, once ``LMKIT_FAULT_SAVE_AFTER`` files were written
  normally, so that a test can SIGKILL the process in the middle of a save. With
  ``LMKIT_FAULT_SAVE_KILL=1`` the process SIGKILLs itself there instead of pausing.
"""
import dataclasses
import hashlib
import io
import os
import signal
import time

import lightning as L
import torch

import lmkit


def _env_steps(name):
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


class SlowSteps(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(float(os.environ.get("LMKIT_FAULT_SLEEP", "0.2")))


class NaNLoss(L.Callback):
    def __init__(self):
        self.steps = _env_steps("LMKIT_FAULT_NAN_STEPS")
        self.from_step = int(os.environ.get("LMKIT_FAULT_NAN_FROM", "-1"))
        self.log_path = os.environ.get("LMKIT_FAULT_BATCH_LOG")
        self.poison = False

    def setup(self, trainer, pl_module, stage):
        objective = pl_module.objective
        if getattr(objective, "_fault_wrapped", False):
            return
        inner = objective.loss

        def loss(model, batch):
            out = inner(model, batch)
            if model.training and self.poison:
                out = dataclasses.replace(out, loss_sum=out.loss_sum * float("nan"))
            return out

        objective.loss = loss
        objective._fault_wrapped = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = pl_module.data_steps  # the data step this batch belongs to
        self.poison = step in self.steps or 0 <= self.from_step <= step
        if self.log_path and trainer.is_global_zero:
            digest = hashlib.sha1(b"".join(mb["input_ids"].numpy().tobytes() for mb in batch["micro_batches"]))
            with open(self.log_path, "a") as f:
                f.write(f"{step} {digest.hexdigest()}\n")


class RankFault(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        plan = [p for p in os.environ.get("LMKIT_FAULT_PLAN", "").split(",") if p]
        if attempt >= len(plan) or trainer.global_rank != int(os.environ.get("LMKIT_FAULT_RANK", "1")):
            return
        mode, step = plan[attempt].split("@")
        if pl_module.data_steps != int(step):
            return
        print(f"fault: attempt {attempt}: rank {trainer.global_rank} {mode}s at step {step}", flush=True)
        if mode == "die":
            os._exit(13)
        time.sleep(3600)


class SlowSave(L.Callback):
    """Patches ``torch.save`` in this process (test-only) so each checkpoint write stalls half-way."""

    def __init__(self):
        if getattr(torch.save, "_fault_slow", False):
            return
        original = torch.save
        pause = float(os.environ.get("LMKIT_FAULT_SAVE_PAUSE", "30"))
        after = int(os.environ.get("LMKIT_FAULT_SAVE_AFTER", "2"))
        count = {"n": 0}

        def slow_save(obj, f, *args, **kwargs):
            if not hasattr(f, "write"):
                return original(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            original(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            count["n"] += 1
            if count["n"] <= after:  # the first files are written normally
                f.write(data)
                return None
            f.write(data[: len(data) // 2])
            f.flush()
            if os.environ.get("LMKIT_FAULT_SAVE_KILL") == "1":
                print(f"fault: SIGKILL half-way through checkpoint write {count['n']}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            print(f"fault: checkpoint write stalled half-way ({len(data) // 2} of {len(data)} bytes)", flush=True)
            time.sleep(pause)
            f.write(data[len(data) // 2:])
            return None

        slow_save._fault_slow = True
        torch.save = slow_save


@lmkit.hookimpl
def lmkit_register_callbacks():
    return [
        lmkit.Component("fault_slow", lambda cfg: SlowSteps(), description="test fault: slow steps"),
        lmkit.Component("fault_nan", lambda cfg: NaNLoss(), description="test fault: NaN losses"),
        lmkit.Component("fault_rank", lambda cfg: RankFault(), description="test fault: a rank dies or hangs"),
        lmkit.Component("fault_slow_save", lambda cfg: SlowSave(), description="test fault: slow checkpoint writes"),
    ]
