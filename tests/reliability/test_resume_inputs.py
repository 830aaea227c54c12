"""Checkpoints and resume paths that cannot be resumed: each is refused from the CLI with one
``lmkit: error:`` line, exit status 2, no traceback, and no new run directory (docs/reliability.md,
"Checkpoints and resuming"). These run ``lmkit.cli.main`` in-process, like test_bad_inputs.py.
"""
from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
import torch

from lmkit_test_utils import TINY
from reliability_helpers import error_lines


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 2-step run: the source of the damaged and foreign checkpoints below."""
    from lmkit.api import run

    run_dir = tmp_path_factory.mktemp("good-run")
    run(TINY + ["trainer.max_steps=2"], run_dir)
    return run_dir


def _cases(tmp: Path, good_run: Path) -> dict[str, tuple[str, str]]:
    """case -> (resume= value, what the error line says)."""
    state = torch.load(good_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (tmp / "zero.ckpt").write_bytes(b"")
    torch.save({**state, "state_dict": {}}, tmp / "empty_state_dict.ckpt")
    torch.save({**state, "state_dict": list(state["state_dict"].values())}, tmp / "list_state_dict.ckpt")
    torch.save(state["state_dict"], tmp / "weights_only.ckpt")  # torch.save(model.state_dict())
    torch.save({k: v for k, v in state.items() if k != "lmkit"}, tmp / "foreign.ckpt")  # Lightning, not lmkit
    (tmp / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    bad_tok = tmp / "run_with_bad_tokenizer"
    shutil.copytree(good_run, bad_tok)
    (bad_tok / "tokenizer.json").write_text('{"lmkit_tokenizer": ')  # cut off mid-write
    (tmp / "a_file").write_text("not a directory\n")
    return {
        "0-byte checkpoint": ("zero.ckpt", "checkpoint 'zero.ckpt' is empty (0 bytes)"),
        "empty state_dict": ("empty_state_dict.ckpt", "its state_dict is empty (no weights)"),
        "list-typed state_dict": ("list_state_dict.ckpt", "its state_dict is a list, not a mapping"),
        "weights only (a bare state_dict)": ("weights_only.ckpt", "holds only weights (a bare state_dict of"),
        "Lightning checkpoint without lmkit's state": (
            "foreign.ckpt", "is not an lmkit training checkpoint (no lmkit state: data position, RNG states)"),
        "garbage tokenizer.json in the run directory": (
            str(bad_tok), "tokenizer.json', the tokenizer the checkpoint was trained with, is damaged"),
        "random bytes": ("random.ckpt", "'random.ckpt' is not a checkpoint (4096 bytes"),
        "path of 300+ characters": ("x" * 300 + ".ckpt", "ENAMETOOLONG"),
        "path under a regular file": ("a_file/last.ckpt", "'a_file' is a file, not a directory"),
        "run directory under a regular file": ("a_file/checkpoints/last.ckpt", "'a_file' is a file, not a directory"),
    }


CASES = ["0-byte checkpoint", "empty state_dict", "list-typed state_dict", "weights only (a bare state_dict)",
         "Lightning checkpoint without lmkit's state", "garbage tokenizer.json in the run directory", "random bytes",
         "path of 300+ characters", "path under a regular file", "run directory under a regular file"]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


@pytest.mark.parametrize("case", CASES)
def test_unresumable_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch, capsys, good_run, case):
    from lmkit.cli import main

    monkeypatch.chdir(tmp_path)
    resume, expected = _cases(tmp_path, good_run)[case]
    before = _digests(tmp_path)
    capsys.readouterr()
    rc = main(TINY + [f"resume={resume}"])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert expected in errors[0], errors[0]
    assert "resume" in errors[0] or "checkpoint" in errors[0] or "tokenizer" in errors[0]
    assert "pickle payload" not in errors[0] and "was refused: it contains objects" not in errors[0]
    assert not (tmp_path / "outputs").exists(), "a refused resume must not leave a run directory"
    assert _digests(tmp_path) == before, "a refused resume must not change any file (logs, config, checkpoints)"
