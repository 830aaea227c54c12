"""NaN/inf losses: the step is skipped (counted, logged, its batch consumed), the run still
ends at ``trainer.max_steps``, and once ``trainer.max_nonfinite_steps`` is spent it stops
with one message, keeping its last good checkpoint.

NaNs are injected by the test-only ``fault_nan`` callback (see fault_plugin.py), which also
records a digest of every training batch so that the data order can be compared.
"""
from __future__ import annotations

import csv
import math

import pytest
import torch

from lmkit.api import run
from lmkit.checkpoint import load_checkpoint_file
from lmkit.errors import LmkitError

from reliability_helpers import error_lines


def batches(log) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in (line.split() for line in log.read_text().splitlines())]


def test_skipped_steps_consume_their_batch_and_max_steps_still_ends_the_run(tmp_path, tiny, faults, monkeypatch,
                                                                              capsys):
    common = tiny + ["callbacks=[fault_nan]", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=5",
                     "logger=csv", "trainer.log_every_n_steps=1", "scheduler.decay_steps=8"]
    monkeypatch.setenv("LMKIT_FAULT_BATCH_LOG", str(tmp_path / "clean.log"))
    run(common + ["trainer.max_steps=8"], tmp_path / "clean")
    clean = batches(tmp_path / "clean.log")
    assert [s for s, _ in clean] == list(range(8)) and len({h for _, h in clean}) == 8

    monkeypatch.setenv("LMKIT_FAULT_BATCH_LOG", str(tmp_path / "nan.log"))
    monkeypatch.setenv("LMKIT_FAULT_NAN_STEPS", "2,3")
    capsys.readouterr()
    summary = run(common + ["trainer.max_steps=6"], tmp_path / "nan")
    err = capsys.readouterr().err
    assert summary["steps"] == 6  # 6 optimizer steps out of 8 batches
    assert batches(tmp_path / "nan.log") == clean, "each batch is used once, in the uninterrupted order"
    warnings = [line for line in err.splitlines() if line.startswith("lmkit: warning: non-finite loss")]
    assert len(warnings) == 2 and "(batch 2)" in warnings[0] and "(2 of trainer.max_nonfinite_steps=10)" in warnings[1]

    state = load_checkpoint_file(tmp_path / "nan" / "checkpoints" / "last.ckpt")
    assert (state["global_step"], state["lmkit"]["data_steps"], state["lmkit"]["nonfinite_steps"]) == (6, 8, 2)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    rows = list(csv.DictReader(open(tmp_path / "nan" / "logs" / "metrics.csv")))
    assert max(float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")) == 2
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]  # one row per batch
    assert [math.isfinite(x) for x in losses] == [True, True, False, False, True, True, True, True]

    # the checkpoint of optimizer step 4 was taken after batch 5: a resumed run goes on with batch 6
    step4 = load_checkpoint_file(tmp_path / "nan" / "checkpoints" / "step000004.ckpt")
    assert step4["lmkit"]["data_steps"] == 6
    monkeypatch.setenv("LMKIT_FAULT_BATCH_LOG", str(tmp_path / "resumed.log"))
    monkeypatch.delenv("LMKIT_FAULT_NAN_STEPS")
    run(common + ["trainer.max_steps=6", f"resume={tmp_path / 'nan' / 'checkpoints' / 'step000004.ckpt'}"],
        tmp_path / "resumed")
    assert batches(tmp_path / "resumed.log") == clean[6:8]


def test_budget_spent_stops_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny, faults,
                                                                                  monkeypatch, capsys):
    from lmkit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMKIT_FAULT_NAN_FROM", "3")  # diverges for good after 3 batches
    rc = main(tiny + ["callbacks=[fault_nan]", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2",
                      "trainer.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert rc == 2
    errors = error_lines(err)
    assert errors == [
        "lmkit: error: the loss was not finite (nan) in 3 steps, more than trainer.max_nonfinite_steps=2. Training "
        "stopped; the last good checkpoint is kept. Lower optimizer.lr, enable trainer.gradient_clip, or use "
        "precision=bf16-mixed."
    ]
    assert "Traceback" not in err and err.count("lmkit: warning: non-finite loss") == 2
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step000002.ckpt"]
    state = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 2 and state["lmkit"]["nonfinite_steps"] == 0


def test_divergent_learning_rate_is_stopped(tmp_path, tiny):
    with pytest.raises(LmkitError, match=r"trainer\.max_nonfinite_steps=1\. Training stopped"):
        run(tiny + ["optimizer.lr=1e30", "trainer.max_nonfinite_steps=1", "trainer.max_steps=20"], tmp_path)
