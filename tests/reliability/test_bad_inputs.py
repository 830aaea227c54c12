"""A catalogue of bad inputs, each refused from the CLI with one clear message, exit status 2
and no run directory left behind. docs/reliability.md lists every case with its message.

Cases already covered by tests/test_cli.py (in a subprocess) are not repeated here:
``objective=causal_lm`` (missing ``+``), an unknown objective, a misspelled group option
(``optimizer=adamww``), a misspelled key (``trainer.max_stepz``), a negative learning rate,
a zero batch size, an incompatible objective/architecture (``model=bert_tiny``), a data
path that does not exist, a sequence longer than the model's positions, and an empty
corpus. These run ``lmkit.cli.main`` in-process (the same code as ``python -m lmkit``);
tests/reliability/test_untrusted.py runs the pickled-checkpoint case in a subprocess.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmkit_test_utils import TINY
from reliability_helpers import error_lines


def cli(args, capsys) -> tuple[int, str]:
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def assert_refused(tmp_path, rc, err, expected):
    assert rc == 2, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == 1, err[-3000:]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists(), "a refused run must not leave a run directory"


# -- data -----------------------------------------------------------------------------------
def _files(tmp: Path) -> dict[str, Path]:
    (tmp / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02 not text")
    (tmp / "latin1.txt").write_bytes("café olé\n".encode("latin-1"))
    (tmp / "tiny.txt").write_text("far too little text for one step\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    (tmp / "nofield.jsonl").write_text(json.dumps({"body": "text under another key"}) + "\n")
    return {p.name: p for p in tmp.iterdir()}


DATA_CASES = [
    ("binary file", ["data=text", "data.path=binary.txt"], "looks like a binary file (it contains NUL bytes)"),
    ("non-UTF-8 file", ["data=text", "data.path=latin1.txt"], "is not valid UTF-8 (bad byte at offset 3)"),
    ("corpus smaller than one step", ["data=text", "data.path=tiny.txt"], "the corpus is too small"),
    ("empty directory", ["data=text", "data.path=empty_dir"], "contains no files"),
    ("invalid JSON line", ["data=jsonl", "data.path=bad.jsonl"], "bad.jsonl:2: invalid JSON"),
    ("missing JSON field", ["data=jsonl", "data.path=nofield.jsonl"], "no field 'text'"),
    ("data source without a path", ["data=text"], "data.path is not set"),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    rc, err = cli(TINY + args, capsys)
    assert_refused(tmp_path, rc, err, expected)


# -- config ---------------------------------------------------------------------------------
CONFIG_CASES = [
    ("misspelled group name", ["optimiser=adamw"], "unknown config key 'optimiser'"),
    ("misspelled top-level key", ["seeed=1"], "Did you mean 'seed'?"),
    ("value of the wrong type", ["trainer.max_steps=ten"], "invalid value for 'trainer.max_steps'"),
    ("zero steps", ["trainer.max_steps=0"], "trainer.max_steps must be >= 1"),
    ("unknown precision", ["trainer.precision=fp16"], "trainer.precision must be one of"),
    ("too short sequences", ["data.seq_len=1"], "data.seq_len must be >= 2"),
    ("non-positive dist timeout", ["trainer.dist_timeout_s=0"], "trainer.dist_timeout_s must be > 0"),
    ("negative non-finite budget", ["trainer.max_nonfinite_steps=-1"], "trainer.max_nonfinite_steps must be >= 0"),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(TINY + args, capsys)
    assert_refused(tmp_path, rc, err, expected)


# -- checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A finished 2-step run with the byte tokenizer."""
    from lmkit.api import run

    run_dir = tmp_path_factory.mktemp("byte-run")
    run(TINY + ["trainer.max_steps=2"], run_dir)
    return run_dir


def _resume_cases(run_dir: Path, tmp: Path) -> dict:
    good = run_dir / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    shutil.copy(good, tmp / "copied.ckpt")
    (tmp / "no_ckpts" / "checkpoints").mkdir(parents=True)
    return {
        "missing path": (["resume=nope.ckpt"], "resume='nope.ckpt' does not exist"),
        "resume=last without runs": (["resume=last"], "resume=last: no run with checkpoints under"),
        "run directory without checkpoints": (["resume=no_ckpts"], "no usable checkpoint in 'no_ckpts/checkpoints'"),
        "truncated checkpoint": (["resume=truncated.ckpt"], "checkpoint 'truncated.ckpt' is truncated or corrupted"),
        "tokenizer differs from the checkpoint's": (
            ["tokenizer=bpe", "tokenizer.vocab_size=300", f"resume={run_dir}"],
            "the tokenizer of this run does not match the one the checkpoint was trained with"),
        "checkpoint of another model size": (
            ["model.d_model=64", "resume=copied.ckpt"], "does not fit this model: model.wte.weight has shape"),
    }


RESUME_CASES = ["missing path", "resume=last without runs", "run directory without checkpoints",
                "truncated checkpoint", "tokenizer differs from the checkpoint's", "checkpoint of another model size"]


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_resume(tmp_path, monkeypatch, capsys, byte_run, case):
    monkeypatch.chdir(tmp_path)
    args, expected = _resume_cases(byte_run, tmp_path)[case]
    rc, err = cli(TINY + args, capsys)
    assert rc == 2 and not (tmp_path / "outputs").exists()
    assert_refused(tmp_path, rc, err, expected)


# -- plugins --------------------------------------------------------------------------------
BOOM = "raise RuntimeError('boom: this plugin is broken')\n"
DUP = """
import lmkit
from lmkit.optim.optimizers import build_sgd, OptimizerConfig

@lmkit.hookimpl
def lmkit_register_optimizers():
    return [lmkit.Component("adamw", lambda groups, cfg: build_sgd(groups, cfg), OptimizerConfig)]
"""


@pytest.fixture
def fresh_plugins():
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()
    yield
    get_plugin_manager.cache_clear()


def test_plugin_raising_at_import_is_named_when_its_component_is_asked_for(tmp_path, monkeypatch, capsys,
                                                                          fake_plugin, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    fake_plugin("lmkit-boom", "lmkit_test_boom", BOOM, version="0.4")
    rc, err = cli(TINY + ["callbacks=[boom_callback]"], capsys)
    assert "lmkit: warning: plugin 'lmkit_test_boom' from lmkit-boom 0.4 failed to load: RuntimeError: boom" in err
    assert_refused(tmp_path, rc, err, "unknown callback 'boom_callback'")
    assert "plugin 'lmkit_test_boom' from lmkit-boom 0.4 failed to load: RuntimeError: boom" in error_lines(err)[0]


def test_two_plugins_registering_one_name(tmp_path, monkeypatch, capsys, fake_plugin, fresh_plugins):
    monkeypatch.chdir(tmp_path)
    fake_plugin("lmkit-dup", "lmkit_test_dup_cli", DUP, version="2.0")
    rc, err = cli(TINY, capsys)
    assert_refused(tmp_path, rc, err, "optimizer 'adamw' is registered twice: by lmkit")
    assert "and by lmkit-dup 2.0" in error_lines(err)[0]
