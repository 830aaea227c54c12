"""The command line as a user meets it: runs, listings, sweeps, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lmkit_test_utils import REPO, TINY


def lmkit(args, cwd, timeout=300, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_tiny_run_prints_run_dir_and_validation(tmp_path):
    out = lmkit(TINY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lmkit: run directory" in out.stdout
    assert "validation at start: loss" in out.stdout and "validation at end:   loss" in out.stdout
    assert "perplexity" in out.stdout and "bits/byte" in out.stdout
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert (run_dir / "config.yaml").exists() and (run_dir / "tokenizer.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


BAD_INPUTS = [
    (["objective=causal_lm"], "write '+objective=causal_lm'"),
    (["+objective=span_corruptio"], "unknown objective 'span_corruptio'"),
    (["optimizer=adamww"], "Did you mean 'adamw'?"),
    (["trainer.max_stepz=3"], "Did you mean 'trainer.max_steps'?"),
    (["optimizer.lr=-1"], "optimizer.lr must be positive"),
    (["data.batch_size=0"], "data.batch_size must be >= 1"),
    (["model=bert_tiny"], "needs a decoder architecture"),
    (["data=text", "data.path=/nonexistent/corpus.txt"], "does not exist"),
    (["data.seq_len=4096"], "longer than the model's positions"),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_message_nonzero_exit_no_files(tmp_path, args, expected):
    out = lmkit(args + ["logger=none"], tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("lmkit: error:")]
    assert len(errors) == 1
    assert not (tmp_path / "outputs").exists(), "a refused run must not leave a run directory"


def test_empty_corpus_is_refused_without_output(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("  \n\n")
    out = lmkit(["data=text", f"data.path={corpus}", "logger=none"], tmp_path)
    assert out.returncode == 2 and "corpus is empty" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_wandb_sweep_agent_command_line(tmp_path):
    """Build the exact argv a wandb agent builds from the sweep config and run it."""
    sweep = yaml.safe_load((REPO / "conf" / "sweeps" / "lr_sweep.yaml").read_text())
    params = {k: (v["values"][0] if "values" in v else v.get("min", v.get("value"))) for k, v in sweep["parameters"].items()}
    args_no_hyphens = [f"{k}={v}" for k, v in params.items()]
    command = []
    for item in sweep["command"]:
        if item == "${env}":
            continue  # wandb's ${env} expands to /usr/bin/env
        elif item == "${interpreter}":
            command.append(sys.executable)
        elif item == "${args_no_hyphens}":
            command.extend(args_no_hyphens)
        else:
            command.append(item)
    assert command[1:3] == ["-m", "lmkit"]
    tiny = [t for t in TINY if t.split("=")[0] not in params]
    out = subprocess.run(command + tiny, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation at end" in out.stdout


def test_hydra_multirun_runs_each_combination(tmp_path):
    out = lmkit(["-m", "optimizer=adamw,sgd"] + [t for t in TINY if not t.startswith("trainer.max_steps")] +
                ["trainer.max_steps=2"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("validation at end") == 2
    assert len(list((tmp_path / "multirun").glob("*/*/[0-9]"))) == 2
