"""Ending a process that took part in torch.distributed without aborting it.

Destroying the process group is not enough under gloo. FSDP and DeviceMesh objects keep the
group's C++ backend, and with it gloo's worker threads, alive until interpreter finalization.
A worker thread that drops the last reference to a finished collective then releases Python
tensors, needs the GIL, cannot take it while the interpreter finalizes, and the process dies
with "terminate called without an active exception" (SIGABRT) after training has succeeded.
A core dump of such a rank shows exactly that stack (``ProcessGroupGloo::runLoop`` ->
``~AsyncBarrierWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``); see also
pytorch/pytorch#179291. torchrun then reports the whole job as failed.

So lmkit's entry points that ran distributed leave through :func:`exit_process`: destroy the
group, run the interpreter's exit handlers (loggers, wandb), flush, and end the process
without finalizing the interpreter.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

_used_process_group = False


def close_process_group() -> None:
    """Destroy the default process group, if any (registered as an exit hook by ``build_run``)."""
    global _used_process_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _used_process_group = True
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass


def used_process_group() -> bool:
    """True when this process has had a torch.distributed process group (now or earlier)."""
    import torch.distributed as dist

    return _used_process_group or (dist.is_available() and dist.is_initialized())


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` after a distributed run: everything an exit does except finalization."""
    close_process_group()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def exit_cli(code: int | None) -> NoReturn:
    """``sys.exit`` for the command line, through :func:`exit_process` when the run was distributed."""
    if used_process_group():
        exit_process(int(code or 0))
    sys.exit(code)
