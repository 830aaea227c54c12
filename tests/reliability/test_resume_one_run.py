"""A resumed run is one run: ``resume=RUN_DIR`` / ``resume=last`` / ``resume=RUN_DIR/checkpoints/X.ckpt``
continue in the run's own directory, with one log of every step (the earlier attempts' logs kept);
``fork=true`` starts a new directory; resuming on other data is refused unless asked for.
End to end through ``lmkit.cli.main`` in-process (the same code as ``python -m lmkit``).
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from lmkit.checkpoint import load_checkpoint_file
from lmkit_test_utils import TINY
from reliability_helpers import error_lines, run_dirs

ARGS = [t for t in TINY if not t.startswith("logger=")] + [
    "logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=10",
    "scheduler.decay_steps=8"]


def cli(args, capsys) -> tuple[int, str, str]:
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rows(path: Path, key: str = "train/loss") -> list[int]:
    """The step of every row of a CSV log that has ``key`` (a step logged twice appears twice)."""
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in (run_dir / "checkpoints").glob("step*.ckpt"))


@pytest.mark.parametrize("how", ["run directory", "last", "checkpoint file"])
def test_resume_continues_in_the_runs_own_directory_with_one_log(tmp_path, monkeypatch, capsys, recwarn, how):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(ARGS + ["trainer.max_steps=4"], capsys)
    assert rc == 0, err[-3000:]
    [run_dir] = run_dirs(tmp_path)
    first_log = (run_dir / "logs" / "metrics.csv").read_bytes()
    resume = {"run directory": str(run_dir), "last": "last",
              "checkpoint file": str(run_dir / "checkpoints" / "step000004.ckpt")}[how]

    rc, out, err = cli(ARGS + ["trainer.max_steps=8", f"resume={resume}"], capsys)
    assert rc == 0, err[-3000:]
    assert run_dirs(tmp_path) == [run_dir], "one run directory under outputs/"
    assert "trained 4 steps (8 in total)" in out
    assert ckpt_steps(run_dir) == [2, 4, 6, 8]
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 8
    log = run_dir / "logs" / "metrics.csv"
    assert rows(log) == list(range(8)), "the log holds every step of the run once, in order"
    assert rows(log, "val/loss") == [0, 1, 3, 5, 7]  # at the start, then every 2 steps
    assert (run_dir / "logs" / "metrics.1.csv").read_bytes() == first_log, "the first attempt's log is kept"
    # its own checkpoints and log are expected there: no "exists and is not empty" warnings
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]


def test_fork_starts_a_new_directory_and_leaves_the_run_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(ARGS + ["trainer.max_steps=4"], capsys)[0] == 0
    [run_dir] = run_dirs(tmp_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "checkpoints").iterdir()}

    rc, out, err = cli(ARGS + ["trainer.max_steps=8", f"resume={run_dir}", "fork=true"], capsys)
    assert rc == 0, err[-3000:]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and dirs[0] == run_dir
    fork = dirs[1]
    assert "trained 4 steps (8 in total)" in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (run_dir / "checkpoints").iterdir()} == before
    assert not (run_dir / "logs" / "metrics.1.csv").exists()
    assert ckpt_steps(fork) == [6, 8] and rows(fork / "logs" / "metrics.csv") == [4, 5, 6, 7]


def test_resume_on_other_data_is_refused_in_one_line_unless_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(ARGS + ["trainer.max_steps=2"], capsys)[0] == 0
    [run_dir] = run_dirs(tmp_path)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}

    rc, out, err = cli(ARGS + ["trainer.max_steps=4", "data.seq_len=16", "seed=7", f"resume={run_dir}"], capsys)
    assert rc == 2 and "Traceback" not in err
    [line] = error_lines(err)
    assert "was trained on other data: " in line
    assert "seed is 7 here but 1337 in the checkpoint" in line
    assert "data.seq_len is 16 here but 32 in the checkpoint" in line
    assert "resume_allow_data_change=true" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts} == files, \
        "a refused resume leaves the run's config, log and checkpoints as they were"
    assert run_dirs(tmp_path) == [run_dir]

    rc, out, err = cli(ARGS + ["trainer.max_steps=4", "seed=7", f"resume={run_dir}", "resume_allow_data_change=true"],
                       capsys)
    assert rc == 0, err[-3000:]
    assert "lmkit: warning: resume_allow_data_change=true: continuing on other data than the checkpoint's (seed is 7" \
        in err
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["lmkit"]["data"]["seed"] == 7


def test_fork_within_the_second_its_run_started_gets_its_own_directory(tmp_path, monkeypatch):
    """Hydra names run directories by the second: a fork must not reuse the directory of the run it forks."""
    from datetime import datetime
    from types import SimpleNamespace

    from lmkit.commands.train import _choose_run_dir

    monkeypatch.chdir(tmp_path)
    now = datetime.now()
    run_dir = Path(f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}")
    (run_dir / "checkpoints").mkdir(parents=True)
    args = SimpleNamespace(overrides=[f"resume={run_dir}", "fork=true"], multirun=False)
    _choose_run_dir(args)
    chosen = [o.split("=", 1)[1] for o in args.overrides if o.startswith("hydra.run.dir=")]
    # this second's directory is the run's: the fork gets the next free name (or, a second later, Hydra's own)
    assert chosen in ([f"{run_dir}-1"], []) and str(run_dir) not in chosen
    args = SimpleNamespace(overrides=[f"resume={run_dir}"], multirun=False)
    _choose_run_dir(args)
    assert args.overrides[-1] == f"hydra.run.dir={run_dir}"
