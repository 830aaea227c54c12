"""Shared pieces of the pipeline tests: the tiny run, the reference step, the torchrun launcher."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
WORKER = HERE / "pp_worker.py"

#: a tiny GPT on the built-in corpus, byte tokenizer; no progress bar, CPU
TINY = [
    "model.n_layer=4", "model.d_model=32", "model.n_head=4", "model.max_seq_len=32",
    "data.seq_len=16", "trainer.accelerator=cpu", "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1", "trainer.val_batches=2", "logger=csv", "callbacks=[]",
]
REF_STEPS = 20
#: the training runs compared with the reference: 8 rows per step, checkpoints at 10 and 20
CURVE = TINY + [f"trainer.max_steps={REF_STEPS}", "trainer.checkpoint_every_n_steps=10",
                "trainer.val_check_interval=10", "data.grad_accum=2"]
#: a pipeline run of that curve: the rest (devices, schedule, data.batch_size) per test
PIPELINE = CURVE + ["strategy=pipeline", "trainer.dist_timeout_s=60"]


def run_reference(run_dir) -> dict:
    """Single process, same data: data.batch_size=4 × grad_accum 2 = 8 rows per step."""
    from lmkit.api import run

    return run(CURVE + ["data.batch_size=4", "trainer.devices=1"], run_dir)


class ToyAux(torch.nn.Module):
    """Wraps a block's MLP and exposes an auxiliary loss of its latest forward, like an MoE layer does."""

    def __init__(self, mlp, coef: float):
        super().__init__()
        self.mlp, self.coef, self._last = mlp, coef, None

    def forward(self, x):
        y = self.mlp(x)
        self._last = y.float().pow(2).mean()
        return y

    def lmkit_aux_losses(self):
        return {} if self._last is None else {"toy_aux": self.coef * self._last}


def add_aux_losses(model) -> None:
    for i, block in enumerate(model.transformer_blocks()):
        block.mlp = ToyAux(block.mlp, 200.0 * (i + 1))


def add_objective_logs(objective) -> None:
    """Make the objective report a metric in ``LossOutput.logs`` (as NSP accuracy does)."""
    loss = objective.loss

    def with_logs(model, batch):
        out = loss(model, batch)
        out.logs = {"label_mean": batch["labels"].float().mean()}
        return out

    objective.loss = with_logs


def reference_step(lm, micro_batches, val_batch) -> dict:
    """Single-process, full-batch: loss, gradients, global gradient norm, one validation batch.

    Normalised as lmkit's LMModule does: each micro-batch's summed loss over the step's
    targets, plus the auxiliary terms (averaged over modules) × micro-batch/step targets.
    """
    from lmkit.models.base import collect_aux_losses

    targets = sum(float(lm.objective.count_targets(mb)) for mb in micro_batches)
    loss_sum = 0.0
    aux_logs: dict[str, float] = {}
    for mb in micro_batches:
        out = lm.objective.loss(lm.model, mb)
        loss = out.loss_sum / targets
        for name, value in out.logs.items():
            aux_logs[name] = aux_logs.get(name, 0.0) + float(value) / len(micro_batches)
        for name, value in collect_aux_losses(lm.model).items():
            loss = loss + value * (float(out.n_targets) / targets)
            aux_logs[name] = aux_logs.get(name, 0.0) + float(value) / len(micro_batches)
        loss.backward()
        loss_sum += float(out.loss_sum.detach())
    grads = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}
    norm = float(torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.grad is not None], 1e9))
    with torch.no_grad():
        val = lm.objective.loss(lm.model, val_batch)
    return {"loss": loss_sum / targets, "grads": grads, "norm": norm, "aux_logs": aux_logs,
            "val_loss": float(val.loss_sum / val.n_targets), "val_nll": float(val.nll_sum),
            "val_logs": {k: float(v) for k, v in val.logs.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int, timeout: float, nnodes: int = 1, check: bool = True) -> str:
    """Run ``pp_worker.py ARGS`` under torchrun (``nnodes`` launches on 127.0.0.1); the output.

    A launch still running after ``timeout`` seconds is killed with its whole process group
    and fails the test, so a hang cannot stall the suite.
    """
    port = free_port()
    cmds = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if nnodes > 1:
            cmd += [f"--nnodes={nnodes}", f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"]
        else:
            cmd += ["--master-addr=127.0.0.1", f"--master-port={port}"]
        cmds.append(cmd + [str(WORKER), *args])
    procs = [spawn(cmd) for cmd in cmds]
    outs = [finish(p, cmd, timeout) for p, cmd in zip(procs, cmds)]
    text = "\n".join(o.stdout for o in outs)
    if check:
        bad = [o for o in outs if o.returncode != 0]
        if bad:
            raise AssertionError(f"torchrun failed (exit {bad[0].returncode}):\n{tail(text)}")
    return text


def tail(text: str, n: int = 6000) -> str:
    lines = [ln for ln in text.splitlines() if "warn" not in ln.lower()]
    return "\n".join(lines)[-n:]


def spawn(cmd, env=None, cwd=None) -> subprocess.Popen:
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    full_env.update(env or {})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)


def finish(proc: subprocess.Popen, cmd, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s (hang?): {' '.join(map(str, cmd))}\n{tail(out)}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def train_losses(run_dir) -> dict[int, float]:
    """step -> train/loss from a run's CSV log."""
    losses = {}
    for row in csv.DictReader(open(Path(run_dir) / "logs" / "metrics.csv")):
        if row.get("train/loss"):
            losses[int(row["step"])] = float(row["train/loss"])
    return losses


def val_losses(run_dir) -> dict[int, float]:
    out = {}
    for row in csv.DictReader(open(Path(run_dir) / "logs" / "metrics.csv")):
        if row.get("val/loss"):
            out[int(row["step"])] = float(row["val/loss"])
    return out
