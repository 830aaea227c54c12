"""Killing and preempting a run: it never loses more than the last checkpoint interval.

* SIGKILL at random steps, resumed each time (``resume=RUN_DIR``, then ``resume=last``): the
  run goes on in its own directory, and its one log (each step once) holds the per-step losses
  of an uninterrupted run.
* SIGTERM / SIGUSR1 (SLURM's warning signal): the run saves the step it just finished,
  prints how to resume and exits with status 3; resuming continues exactly.

Mixed precision: Lightning turns ``precision=16-mixed`` into ``bf16-mixed`` on CPU (fp16
AMP needs a GPU), so there is no GradScaler state to test here; the SIGKILL test runs in
``bf16-mixed``.
"""
from __future__ import annotations

import csv
import os
import random
import signal

import pytest

from lmkit.api import run
from lmkit.checkpoint import load_checkpoint_file

from reliability_helpers import LONG, logged_steps, run_dirs, start_lmkit, step_losses, sub_env, wait_for

STEP_SLEEP = 0.25  # seconds per step in the interrupted runs (fault_slow), so a signal lands mid-run


def _new_run_dir(cwd, known, proc):
    return wait_for(lambda: next((d for d in run_dirs(cwd) if d not in known), None), 300, proc)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_matches_uninterrupted_run(tmp_path, faults):
    common = LONG + ["trainer.max_steps=12", "trainer.checkpoint_every_n_steps=2", "data.grad_accum=2",
                     "model.dropout=0.1", "trainer.precision=bf16-mixed"]
    reference = step_losses_of(run(common + ["callbacks=[]"], tmp_path / "reference"))
    assert sorted(reference) == list(range(12))

    seed = int(os.environ.get("LMKIT_TEST_SEED") or random.randrange(1 << 30))  # set it to replay a failure
    rng = random.Random(seed)
    first = rng.randint(3, 5)
    kill_at = [first, rng.randint(first + 2, 9)]  # progress (steps done) at which to SIGKILL
    env = sub_env(LMKIT_FAULT_SLEEP=STEP_SLEEP)
    args = common + ["callbacks=[fault_slow]"]
    run_dir, resume, saved = None, None, 0
    for attempt, target in enumerate(kill_at + [None]):
        proc = start_lmkit(args + ([f"resume={resume}"] if resume else []), tmp_path, env, f"attempt{attempt}")
        if run_dir is None:
            run_dir = _new_run_dir(tmp_path, [], proc)
        if target is None:
            assert proc.wait(timeout=300) == 0, (tmp_path / f"attempt{attempt}.err").read_text()[-3000:]
            break
        # this attempt logs (the earlier log is kept as metrics.N.csv first), then reaches the target
        wait_for(lambda: attempt == 0 or (run_dir / "logs" / f"metrics.{attempt}.csv").exists(), 300, proc)
        wait_for(lambda: max(step_losses(run_dir), default=-1) + 1 >= target, 300, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        done = max(step_losses(run_dir)) + 1
        saved = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]
        assert 0 <= done - saved <= 2, f"lost more than one checkpoint interval (seed {seed})"
        resume = run_dir if attempt == 0 else "last"  # a run directory, then the newest run

    assert run_dirs(tmp_path) == [run_dir], "every attempt continues in the run's own directory"
    assert f"trained {12 - saved} steps (12 in total)" in (tmp_path / "attempt2.out").read_text()
    # one log of the run: each step once, the later attempt's rows from the checkpoint it resumed from
    rows = [int(r["step"]) for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("train/loss")]
    assert rows == list(range(12)), f"kills at {kill_at} (seed {seed})"
    assert (run_dir / "logs" / "metrics.1.csv").exists() and (run_dir / "logs" / "metrics.2.csv").exists()
    # bit for bit: same seed, same single-threaded arithmetic, RNG and data order restored
    assert step_losses(run_dir) == reference, f"kills at {kill_at} (seed {seed})"


def step_losses_of(summary) -> dict[int, float]:
    from pathlib import Path

    return step_losses(Path(summary["run_dir"]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_the_step_prints_resume_and_resumes_exactly(tmp_path, faults, sig):
    common = LONG + ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=100"]  # no periodic checkpoint
    proc = start_lmkit(common + ["callbacks=[fault_slow]"], tmp_path, sub_env(LMKIT_FAULT_SLEEP=STEP_SLEEP))
    run_dir = _new_run_dir(tmp_path, [], proc)
    wait_for(lambda: logged_steps(run_dir) >= 3, 300, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 3
    err = (tmp_path / "lmkit.err").read_text()
    stopped = [line for line in err.splitlines() if line.startswith("lmkit: stopped by")]
    assert len(stopped) == 1, err[-3000:]
    ckpt = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    step = ckpt["global_step"]
    assert 3 <= step < 8 and ckpt["lmkit"]["data_steps"] == step
    assert stopped[0].startswith(f"lmkit: stopped by {sig.name} at step {step}; checkpoint saved: ")
    assert f"resume={run_dir.resolve()}" in stopped[0] and "python -m lmkit " in stopped[0]
    assert (run_dir / "checkpoints" / f"step{step:06d}.ckpt").exists()
    assert "Traceback" not in err

    reference = step_losses_of(run(common + ["callbacks=[]"], tmp_path / "reference"))
    resumed = run(common + ["callbacks=[]", f"resume={run_dir}"], tmp_path / "resumed")
    assert resumed["steps"] == 8
    after = step_losses(tmp_path / "resumed")
    assert sorted(after) == list(range(step, 8))
    assert {**step_losses(run_dir), **after} == reference


def test_resume_hint_keeps_the_overrides_and_replaces_resume():
    from lmkit.preemption import resume_hint

    assert resume_hint("/runs/a b", ["trainer.max_steps=9", "resume=old", "callbacks=[x]"]) == (
        "python -m lmkit trainer.max_steps=9 'callbacks=[x]' 'resume=/runs/a b'")
    # resume=auto finds the fixed run directory's checkpoints itself: the same command resumes
    assert resume_hint("/r", ["resume=auto", "hydra.run.dir=/r"]) == "python -m lmkit resume=auto hydra.run.dir=/r"
