"""Helpers for the reliability tests: the fault plugin, lmkit subprocesses, logs and checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lmkit_test_utils import TINY, step_losses  # noqa: F401  (step_losses: re-exported)

HERE = Path(__file__).resolve().parent
FAULTS_SOURCE = (HERE / "fault_plugin.py").read_text()

# A run long enough to be interrupted; the LR schedule's horizon is fixed so that a run
# stopped early has the same schedule as the full one.
LONG = [t for t in TINY if not t.startswith(("trainer.max_steps", "logger", "trainer.val_check_interval"))] + [
    "logger=csv", "trainer.log_every_n_steps=1", "scheduler.decay_steps=12", "trainer.val_check_interval=1000",
]


def sub_env(**extra) -> dict:
    """Environment of an lmkit subprocess: one thread (the same arithmetic as the in-process runs)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}}


def start_lmkit(args, cwd: Path, env: dict, log_name: str = "lmkit") -> subprocess.Popen:
    out = open(cwd / f"{log_name}.out", "w")
    err = open(cwd / f"{log_name}.err", "w")
    return subprocess.Popen([sys.executable, "-m", "lmkit", *args], cwd=cwd, env=env, stdout=out, stderr=err)


def run_lmkit(args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=cwd, env=env or sub_env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"lmkit exited with {proc.returncode} before the expected point")
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def run_dirs(cwd: Path) -> list[Path]:
    """Run directories created by Hydra under ``cwd/outputs``, oldest first."""
    return sorted((cwd / "outputs").glob("*/*"), key=lambda p: p.stat().st_ctime_ns)


def logged_steps(run_dir: Path) -> int:
    """Training rows in the run's CSV log (the log is flushed at every logging step)."""
    return len(step_losses(run_dir))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lmkit: error:")]
