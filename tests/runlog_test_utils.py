"""Synthetic run and multirun directories, laid out as lmkit and Lightning's csv logger write them."""
from __future__ import annotations

import csv
from pathlib import Path

import yaml

HEADER = ["epoch", "global_step", "step", "train/loss", "train/lr", "train/ppl", "train/tokens_per_s",
          "train/tokens_seen", "val/bpb", "val/loss", "val/ppl"]


def write_run(run_dir: Path, steps: int = 6, val_every: int = 2, overrides=(), lr: float = 1e-3,
              validate: bool = True, log_lr: bool = True, logger: str = "csv", batch_size: int = 4,
              seq_len: int = 32, grad_accum: int = 1, tokens_per_step: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """A finished run of ``steps`` steps; returns the ``(step, value)`` points written per metric.

    Validation rows carry Lightning's ``step``: the steps done for the one at the start (and at
    the end when ``steps`` is not a multiple of ``val_every``), one less inside fit.
    """
    run_dir.mkdir(parents=True)
    config = {"data": {"batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
                       "batch_ramp_start": 1, "batch_ramp_steps": 0},
              "optimizer": {"name": "adamw", "lr": lr},
              "trainer": {"max_steps": steps, "val_check_interval": val_every, "validate_at_start": True,
                          "devices": "auto", "num_nodes": 1},
              "logger": {"name": logger}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    points: dict[str, list[tuple[int, float]]] = {}
    rows = []

    def add(row: dict, step: int) -> None:
        rows.append(row)
        for k, v in row.items():
            if k not in ("epoch", "global_step", "step"):
                points.setdefault(k, []).append((step, v))

    def validation(k: int, logged: int) -> None:
        loss = 5.0 - 0.1 * k - 10 * lr
        add({"epoch": 0, "step": logged, "val/loss": loss, "val/ppl": 2.718 ** loss, "val/bpb": loss / 0.69}, k)

    if validate:
        validation(0, 0)
    for k in range(1, steps + 1):
        row = {"epoch": 0, "global_step": float(k), "step": k - 1, "train/loss": 5.2 - 0.1 * k,
               "train/ppl": 180.0 - k, "train/tokens_per_s": 1000.0 + k}
        if log_lr:
            row["train/lr"] = lr * k / steps
        if tokens_per_step:  # what the compute_accounting callback logs
            row["train/tokens_seen"] = float(tokens_per_step * k)
        add(row, k)
        points.setdefault("global_step", []).append((k, float(k)))
        if validate and k % val_every == 0:
            validation(k, k - 1)
    if validate and steps % val_every:
        validation(steps, steps)
    if logger == "csv":
        (run_dir / "logs").mkdir()
        with open(run_dir / "logs" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HEADER)
            writer.writeheader()
            writer.writerows(rows)
    return points


def write_multirun(sweep_dir: Path, task: list[str]) -> None:
    """The ``multirun.yaml`` Hydra writes at the start of a sweep, for the overrides ``task``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = {"hydra": {"mode": "MULTIRUN", "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task}}}
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(saved))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli(args, capsys) -> tuple[int, str, str]:
    """``python -m lmkit ARGS`` in-process: exit status, stdout, stderr."""
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(rc: int, err: str, expected: str) -> None:
    """Refused with exit status 2 and one ``lmkit: error:`` line holding ``expected``."""
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lmkit: error:")]
    assert len(lines) == 1 and expected in lines[0], err
