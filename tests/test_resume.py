"""Checkpoint and exact resume: the resumed run's per-step losses equal the uninterrupted run's."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lmkit.api import run
from lmkit.checkpoint import load_checkpoint_file


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("extra", [
    [],  # plain
    ["data.grad_accum=2", "model.dropout=0.1"],  # accumulation + RNG-dependent dropout
])
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny, extra):
    common = tiny + extra + ["logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3",
                             "trainer.val_check_interval=3", "data.batch_size=8",
                             "scheduler.decay_steps=8"]  # the schedule's horizon must not depend on where a run stops
    full = run(common + ["trainer.max_steps=8"], tmp_path / "full")
    assert full["steps"] == 8
    run(common + ["trainer.max_steps=3"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(ckpt)
    assert state["global_step"] == 3 and state["lmkit"]["data_steps"] == 3
    resumed = run(common + ["trainer.max_steps=8", f"resume={ckpt}"], tmp_path / "resumed")
    assert resumed["steps"] == 8
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5, 6, 7]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_crosses_epoch_boundary_in_the_same_order(tmp_path, tiny):
    """A tiny corpus gives 3 steps per epoch; resuming mid-epoch 2 must keep the data order."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of a small corpus for resume tests.\n" for i in range(120)))
    common = tiny + ["data=text", f"data.path={corpus}", "logger=csv", "trainer.log_every_n_steps=1",
                     "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=4", "data.batch_size=8",
                     "scheduler.decay_steps=9"]
    run(common + ["trainer.max_steps=9"], tmp_path / "full")
    run(common + ["trainer.max_steps=4"], tmp_path / "part")
    run(common + ["trainer.max_steps=9", f"resume={tmp_path / 'part'}"], tmp_path / "resumed")
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_checkpoint_dir_holds_config_tokenizer_and_keeps_last_k(tmp_path, tiny):
    run(tiny + ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=2"], tmp_path)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000006.ckpt", "step000008.ckpt"]
    assert (tmp_path / "config.yaml").read_text().count("max_steps: 8") == 1
    assert not list(tmp_path.rglob(".*.tmp*")), "no temporary files left behind"


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path, tiny):
    from lmkit.errors import CheckpointError

    run(tiny + ["trainer.max_steps=2"], tmp_path / "r")
    good = tmp_path / "r" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint_file(truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_file(evil)


def test_resumed_loader_is_resumable_and_warns_nothing(tmp_path, tiny, recwarn):
    """The train loader's position is part of the checkpoint (Lightning's stateful-loader protocol), so
    Lightning has no cause for "your dataloader is not resumable" on a mid-epoch resume."""
    common = tiny + ["scheduler.decay_steps=6"]
    run(common + ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(ckpt)
    [loader_state] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["data_steps"] == 3 == state["lmkit"]["data_steps"]
    recwarn.clear()
    resumed = run(common + ["trainer.max_steps=6", f"resume={ckpt}"], tmp_path / "resumed")
    assert resumed["steps"] == 6
    assert not [w for w in recwarn if "not resumable" in str(w.message)], [str(w.message) for w in recwarn]

