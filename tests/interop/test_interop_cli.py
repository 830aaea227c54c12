"""``python -m lmkit export``: a trained tiny run to an HF directory, end to end, and its refusals.

Decided: OUT_DIR must be new or empty; a non-empty one is refused unless ``--force`` (which
replaces it whole). RUN_DIR exports its newest checkpoint; a checkpoint file exports with its
run directory's config and tokenizer.
"""
from __future__ import annotations

import shutil

import pytest
import yaml
from interop_helpers import TOL, batch, hf_model, max_logit_diff, same_state, transformers
from lmkit_test_utils import TINY

import lmkit.cli
from lmkit.interop.families import family_of
from lmkit.interop.load import load_hf
from lmkit.interop.source import read_source


def _train(run_dir, extra=()):
    assert lmkit.cli.main([*TINY, *extra, f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("run") / "gpt")


def _lmkit_model(source):
    src = read_source(source)
    model = family_of(src.architecture).model_cls(src.config)
    model.load_state_dict(src.model_state)
    return model.eval(), src


def test_export_trained_run_loads_in_transformers(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert lmkit.cli.main(["export", str(run_dir), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"as GPT2LMHeadModel to {out}" in said
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model, src = _lmkit_model(run_dir)
    hf = hf_model(out, "AutoModelForCausalLM")
    ids, pad = batch(256, T=32, pad_from=20)
    assert max_logit_diff(model, hf, ids, pad) < TOL
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Export me: ünïcode, [MASK] and\ttabs."
    assert tok(text, add_special_tokens=False).input_ids == src.tokenizer.encode(text)
    loaded = load_hf(out)
    assert same_state(model.state_dict(), loaded.model.state_dict()) == []
    assert loaded.tokenizer.fingerprint() == src.tokenizer.fingerprint()


def test_export_a_checkpoint_file(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "step000002.ckpt"
    assert lmkit.cli.main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    model, _ = _lmkit_model(ckpt)
    assert same_state(model.state_dict(), load_hf(tmp_path / "hf").model.state_dict()) == []
    latest, _ = _lmkit_model(run_dir)
    assert same_state(model.state_dict(), latest.state_dict()) != []  # step 2, not the newest


def test_out_dir_not_empty_is_refused_unless_force(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert lmkit.cli.main(["export", str(run_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lmkit: error:" in err and "exists and is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert lmkit.cli.main(["export", str(run_dir), str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or old directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert lmkit.cli.main(["export", str(run_dir), str(empty)]) == 0


@pytest.mark.parametrize("args,expected", [
    (["/nonexistent/run"], "does not exist"),
    ([], "takes a run directory"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_arguments_one_line(args, expected, tmp_path, capsys):
    argv = ["export", *args] + ([str(tmp_path / "hf")] if args and not args[0].startswith("-") else [])
    if args and args[0].startswith("-"):
        argv += ["a", "b"]
    assert lmkit.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "hf").exists()


def test_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert lmkit.cli.main(["export", str(tmp_path / "notarun"), str(tmp_path / "hf")]) == 2
    assert "not an lmkit run directory (no config.yaml)" in capsys.readouterr().err


def test_moe_run_is_refused_in_one_line(run_dir, tmp_path, capsys):
    moe_run = tmp_path / "moe"
    shutil.copytree(run_dir, moe_run)
    config = yaml.safe_load((moe_run / "config.yaml").read_text())
    config["model"]["moe"] = {"num_experts": 4}
    (moe_run / "config.yaml").write_text(yaml.safe_dump(config))
    assert lmkit.cli.main(["export", str(moe_run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mixture-of-experts" in err and "one dense MLP per layer" in err
    assert not (tmp_path / "hf").exists()


def test_sharded_checkpoint_without_the_plugin_names_the_consolidate_command(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"x")
    (ckpt / "meta.pt").write_bytes(b"x")
    (run / "config.yaml").write_text("model:\n  name: gpt\n")
    monkeypatch.setitem(__import__("sys").modules, "lmkit_fsdp.consolidate", None)
    assert lmkit.cli.main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert f"python -m lmkit_fsdp.consolidate {ckpt} OUT.ckpt" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "moe"])
def test_fsdp_sharded_run_exports_and_moe_run_is_refused(kind, tmp_path, capsys):
    """A real single-process fsdp run (sharded checkpoints) exports the weights its consolidated checkpoint
    holds; a real lmkit-moe run is refused."""
    pytest.importorskip("lmkit_fsdp" if kind == "fsdp" else "lmkit_moe")
    extra = ["strategy=fsdp", "trainer.devices=1"] if kind == "fsdp" else ["model.moe.num_experts=2", "model.moe.every=1"]
    other = _train(tmp_path / "run", extra)
    rc = lmkit.cli.main(["export", str(other), str(tmp_path / "hf")])
    if kind == "moe":
        assert rc == 2 and "mixture-of-experts" in capsys.readouterr().err
        return
    assert rc == 0
    sharded = other / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    from lmkit_fsdp.consolidate import consolidate

    from lmkit.checkpoint import load_checkpoint_file

    consolidated = load_checkpoint_file(consolidate(sharded, tmp_path / "one.ckpt"))["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in consolidated.items()}
    assert same_state(weights, load_hf(tmp_path / "hf").model.state_dict()) == []


def test_export_is_listed_in_help(capsys):
    assert lmkit.cli.main(["--help"]) == 0
    assert "export" in capsys.readouterr().out
    assert lmkit.cli.main(["export", "--help"]) == 0
    assert "RUN_DIR|CHECKPOINT OUT_DIR" in capsys.readouterr().out


def test_training_only_heads_are_left_out_and_listed(tmp_path, capsys):
    """SpanBERT's span-boundary head has no place in BertForMaskedLM: the export lists it in one line."""
    base = [a for a in TINY if not a.startswith("model.")]
    run = _train(tmp_path / "run", ["+objective=span_bert", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
                                    *base])
    capsys.readouterr()
    assert lmkit.cli.main(["export", str(run), str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[1] == ("lmkit: left out: pooler.* (the [CLS] pooler: without a sentence-pair head it is frozen and "
                       "untrained, and BertForMaskedLM has no pooler); objective.sbo.*, objective.sbo_bias "
                       "(training-only objective heads; BertForMaskedLM has no place for them)")
    hf = hf_model(tmp_path / "hf", "AutoModelForMaskedLM")
    model, _ = _lmkit_model(run)
    ids, pad = batch(256, T=20, pad_from=12)
    assert max_logit_diff(model, hf, ids, pad) < TOL


@pytest.mark.slow
def test_pipeline_run_exports_directly(tmp_path):
    """A 2-stage pipeline run (torchrun, 2 processes) saves whole-model checkpoints: they export as they are."""
    import os
    import subprocess
    import sys

    pytest.importorskip("lmkit_pipeline")
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("model.n_layer")] + ["model.n_layer=2", "trainer.max_steps=2",
                                                                     "strategy=pipeline", f"hydra.run.dir={run}"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lmkit", *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert lmkit.cli.main(["export", str(run), str(tmp_path / "hf")]) == 0
    model, _ = _lmkit_model(run)
    hf = hf_model(tmp_path / "hf", "AutoModelForCausalLM")
    ids, pad = batch(256, T=20, pad_from=12)
    assert max_logit_diff(model, hf, ids, pad) < TOL
    assert same_state(model.state_dict(), load_hf(tmp_path / "hf").model.state_dict()) == []
