"""Launch helpers for the lmkit-fsdp tests (CPU only, gloo).

Multi-process runs go through ``torchrun`` subprocesses with a timeout, so a collective that
never completes fails the test instead of hanging it. Every run uses the same tiny GPT.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fsdp_worker.py"
RUN_TIMEOUT = 150  # seconds for one launch; a hang fails the test

# 2 layers, 4 heads, d_model 32, 32-token windows. Constant LR (after a 1-step warmup) so
# that a run stopped at step 3 and resumed is the same schedule as an uninterrupted one;
# Adam eps 1e-6 so that near-zero gradients (whose sign depends on summation order) do
# not amplify float rounding in the parameter comparison.
TINY = [
    "model.n_layer=2", "model.n_head=4", "model.d_model=32", "model.max_seq_len=64",
    "data.seq_len=32", "trainer.val_check_interval=1000", "trainer.val_batches=2",
    "trainer.validate_at_start=false", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu", "logger=none", "callbacks=[]", "scheduler=constant",
    "scheduler.warmup_steps=1", "optimizer.eps=1e-6",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["LMKIT_CACHE"] = str(cache)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


PORT_CLASH = ("address already in use", "eaddrinuse")


def _wait(procs, logs, what: str) -> str | None:
    """None when every process exited 0; else a failure message (a hang kills them all)."""
    for p, log in zip(procs, logs):
        try:
            p.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return f"{what} did not finish in {RUN_TIMEOUT}s (hang?); log tail:\n{_tail(log)}"
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            return f"{what} failed (exit {p.returncode}); log tail:\n{_tail(log)}"
    return None


def _tail(log: Path, n: int = 4000) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [ln for ln in text.splitlines() if "Warning" not in ln and "warn(" not in ln]
    return "\n".join(lines)[-n:]


class Launcher:
    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache

    def run(self, name: str, overrides: list[str], nproc: int = 1, nnodes: int = 1) -> dict:
        """Train in ``root/name`` with ``TINY + overrides`` on ``nproc`` ranks per node; the worker's results."""
        run_dir = self.root / name
        out = self.root / f"{name}.pt"
        spec = self.root / f"{name}.json"
        spec.write_text(json.dumps({"overrides": TINY + overrides, "run_dir": str(run_dir), "out": str(out)}))
        for attempt in range(2):
            failure = self._launch(name, spec, nproc, nnodes)
            # another process on this machine may take the rendezvous port between its choice and its use
            if failure is None or attempt or not any(m in failure.lower() for m in PORT_CLASH):
                break
        if failure is not None:
            pytest.fail(failure)
        result = torch.load(out, weights_only=False)
        result["run_dir"] = run_dir
        return result

    def _launch(self, name: str, spec: Path, nproc: int, nnodes: int) -> str | None:
        env = _env(self.cache)
        procs, logs = [], []
        if nproc == 1 and nnodes == 1:
            log = self.root / f"{name}.log"
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec)], stdout=f, stderr=subprocess.STDOUT, env=env))
            logs.append(log)
        else:
            port = free_port()
            for node in range(nnodes):
                log = self.root / f"{name}.node{node}.log"
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
                if nnodes > 1:
                    cmd += [f"--nnodes={nnodes}", f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"]
                else:
                    cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
                cmd += [str(WORKER), str(spec)]
                with open(log, "w") as f:
                    procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
                logs.append(log)
        return _wait(procs, logs, f"run '{name}' ({nnodes} node(s) x {nproc} rank(s))")
