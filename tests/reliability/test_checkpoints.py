"""Checkpoint files survive kills, full disks and damage; resuming falls back to the last good one."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from lmkit.api import run
from lmkit.checkpoint import AtomicCheckpointIO, load_checkpoint_file, resolve_auto_resume, resolve_resume
from lmkit.errors import CheckpointError

from reliability_helpers import LONG, run_dirs, start_lmkit, step_losses, sub_env, wait_for


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, faults):
    """The write of step 4's checkpoint stalls half-way (fault_slow_save); SIGKILL it there."""
    args = LONG + ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2"]
    env = sub_env(LMKIT_FAULT_SAVE_PAUSE=120, LMKIT_FAULT_SAVE_AFTER=2)  # step 2's two files are written whole
    proc = start_lmkit(args + ["callbacks=[fault_slow_save]"], tmp_path, env)
    try:
        run_dir = wait_for(lambda: next(iter(run_dirs(tmp_path)), None), 300, proc)
        wait_for(lambda: "stalled half-way" in (tmp_path / "lmkit.out").read_text(), 300, proc)
        ckpt_dir = run_dir / "checkpoints"
        partial = list(ckpt_dir.glob(".step000004.ckpt.tmp*"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        before = {name: sha(ckpt_dir / name) for name in ("last.ckpt", "step000002.ckpt")}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ckpt_names(run_dir) == [partial[0].name, "last.ckpt", "step000002.ckpt"]
    assert {name: sha(ckpt_dir / name) for name in before} == before, "the previous checkpoint was not touched"
    with pytest.raises(CheckpointError):  # the half-written file itself is unusable ...
        load_checkpoint_file(partial[0])
    for resume in (str(run_dir), "last"):  # ... and never chosen
        path, notes = resolve_resume(resume, outputs_root=tmp_path / "outputs")
        assert path.name == "last.ckpt" and notes == []
    assert load_checkpoint_file(path)["global_step"] == 2
    resumed = run(args + ["callbacks=[]", f"resume={run_dir}"], tmp_path / "resumed")
    assert resumed["steps"] == 6


def test_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    before = sha(target)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert sha(target) == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:  # flip bytes inside the largest tensor: torch.load still loads it; the records' CRC-32 catches it
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        mid = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
        path.write_bytes(bytes(data))


def test_damaged_newest_checkpoints_fall_back_to_the_previous_good_one(tmp_path, tiny, capsys):
    outputs = tmp_path / "outputs"
    run_dir = outputs / "day" / "run"
    common = tiny + ["trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=3"]
    run(common + ["trainer.max_steps=6"], run_dir)
    ckpts = run_dir / "checkpoints"
    assert ckpt_names(run_dir) == ["last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]
    _damage(ckpts / "last.ckpt", "truncate")
    _damage(ckpts / "step000006.ckpt", "flip")

    with pytest.raises(CheckpointError, match="is truncated or corrupted"):
        load_checkpoint_file(ckpts / "last.ckpt")
    with pytest.raises(CheckpointError, match="does not match the CRC-32"):
        load_checkpoint_file(ckpts / "step000006.ckpt")
    for resume in (str(run_dir), "last"):
        path, notes = resolve_resume(resume, outputs_root=outputs)
        assert path == ckpts / "step000004.ckpt"
        assert len(notes) == 2 and all(n.startswith("skipping damaged checkpoint: ") for n in notes)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):  # an explicit file: no silent fallback
        resolve_resume(str(ckpts / "last.ckpt"))

    capsys.readouterr()
    resumed = run(common + ["trainer.max_steps=8", f"resume={run_dir}"], tmp_path / "resumed")
    out = capsys.readouterr().out
    assert "lmkit: skipping damaged checkpoint" in out and "resuming from" in out and "step000004.ckpt" in out
    assert resumed["steps"] == 8

    for p in ckpts.glob("step*.ckpt"):
        _damage(p, "truncate")
    with pytest.raises(CheckpointError, match="no usable checkpoint in"):
        resolve_resume(str(run_dir))


def test_resume_auto_in_a_fixed_directory_restarts_and_keeps_last_k(tmp_path, tiny):
    """The same command starts the run, then resumes it (torchrun --max-restarts, SLURM requeue)."""
    run_dir = tmp_path / "run"
    common = tiny + ["trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=2", "resume=auto", "logger=csv",
                     "trainer.log_every_n_steps=1"]
    assert resolve_auto_resume(run_dir)[0] is None
    first = run(common + ["trainer.max_steps=6"], run_dir)
    assert first["steps"] == 6 and ckpt_names(run_dir) == ["last.ckpt", "step000004.ckpt", "step000006.ckpt"]
    assert resolve_auto_resume(run_dir)[0] == run_dir / "checkpoints" / "last.ckpt"
    second = run(common + ["trainer.max_steps=10"], run_dir)
    assert second["steps"] == 10
    assert ckpt_names(run_dir) == ["last.ckpt", "step000008.ckpt", "step000010.ckpt"]
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 10
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    # one log of the whole run (each step once); the first attempt's log is kept as it was
    assert sorted(train_rows(run_dir / "logs" / "metrics.csv")) == list(range(10))
    assert sorted(train_rows(run_dir / "logs" / "metrics.1.csv")) == list(range(6))


def train_rows(path: Path) -> list[int]:
    """The step of every training row of a CSV log (a step logged twice appears twice)."""
    return [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("train/loss")]


def test_tokenizer_or_model_that_does_not_fit_the_checkpoint_is_refused(tmp_path, tiny):
    run(tiny + ["trainer.max_steps=2"], tmp_path / "byte")
    copied = tmp_path / "elsewhere.ckpt"  # outside its run directory: no tokenizer.json to compare with
    shutil.copy(tmp_path / "byte" / "checkpoints" / "last.ckpt", copied)
    with pytest.raises(CheckpointError, match=r"does not fit this model: model\.wte\.weight has shape"):
        run(tiny + ["model.d_model=64", f"resume={copied}"], tmp_path / "bigger")
    assert os.path.exists(copied)


@pytest.mark.parametrize("killed_in", ["stepNNNNNN.ckpt", "last.ckpt"])
def test_sigkill_inside_a_checkpoint_write_loses_no_log_row(tmp_path, monkeypatch, capsys, faults, killed_in):
    """Every step a checkpoint holds has its log row. SIGKILL half-way through writing step 4's
    checkpoint files: its step000004.ckpt (the run resumes from step 2) or its last.ckpt (the whole
    step000004.ckpt is there: the run resumes from step 4, whose row Lightning used to write only
    after the checkpoint). Resumed in its own directory, the run's log holds every step once."""
    from lmkit.cli import main

    args = LONG + ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2"]
    after = {"stepNNNNNN.ckpt": 2, "last.ckpt": 3}[killed_in]  # files written whole before the killed one
    proc = start_lmkit(args + ["callbacks=[fault_slow_save]"], tmp_path,
                       sub_env(LMKIT_FAULT_SAVE_KILL=1, LMKIT_FAULT_SAVE_AFTER=after))
    assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "lmkit.err").read_text()[-3000:]
    [run_dir] = run_dirs(tmp_path)
    path, _ = resolve_resume(str(run_dir))
    held = load_checkpoint_file(path)["lmkit"]["data_steps"]
    assert held == {"stepNNNNNN.ckpt": 2, "last.ckpt": 4}[killed_in]
    assert set(range(held)) <= set(train_rows(run_dir / "logs" / "metrics.csv")), "a step the checkpoint holds has no row"

    monkeypatch.chdir(tmp_path)
    assert main(args + ["callbacks=[]", f"resume={run_dir}"]) == 0, capsys.readouterr().err[-3000:]
    assert run_dirs(tmp_path) == [run_dir]
    assert train_rows(run_dir / "logs" / "metrics.csv") == list(range(6)), "every step once, in order"
