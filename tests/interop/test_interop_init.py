"""``init_from=PATH``: a run starting from an HF directory or an lmkit run, with fresh optimizer and data."""
from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import first_val_loss_gap, same_state, transformers  # noqa: F401  (offline transformers)
from lmkit_test_utils import TINY

import lmkit.api
import lmkit.cli
from lmkit.interop.exporter import export_model
from lmkit.models.bert import BERT, BERTConfig
from lmkit.tokenizers.byte import ByteTokenizer

BASE = [a for a in TINY if not a.startswith("model.")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny GPT run and its HF export."""
    root = tmp_path_factory.mktemp("init")
    assert lmkit.cli.main([*TINY, f"hydra.run.dir={root / 'run'}"]) == 0
    assert lmkit.cli.main(["export", str(root / "run"), str(root / "hf")]) == 0
    return root / "run", root / "hf"


def test_first_validation_loss_equals_the_hf_models_loss(trained, tmp_path, capsys):
    run_dir, hf_dir = trained
    built = lmkit.api.build([*TINY, f"init_from={hf_dir}"], tmp_path / "new")
    said = capsys.readouterr().out
    assert f"lmkit: init_from: loaded 16 tensors from {hf_dir}; optimizer, schedule and data start fresh" in said
    assert "initialised fresh" not in said and "sizes come from" not in said  # the same tiny sizes
    assert first_val_loss_gap(built, hf_dir) < 1e-5


def test_init_from_an_lmkit_run_takes_its_sizes_and_weights(trained, tmp_path, capsys):
    run_dir, _ = trained
    run = tmp_path / "adapt"
    assert lmkit.cli.main([*BASE, "model=gpt_small", "trainer.max_steps=2", f"init_from={run_dir}",
                           f"hydra.run.dir={run}"]) == 0
    said = capsys.readouterr().out
    assert "model.n_layer=1 (was 6)" in said and "model.d_model=32 (was 384)" in said
    assert "loaded 16 tensors from" in said and "last.ckpt" in said
    # the new run's config.yaml holds the sizes it trained with: it exports and resumes as what it is
    assert lmkit.cli.main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_embd"] == 32


def test_missing_heads_are_fresh_and_listed(tmp_path, capsys):
    tok = ByteTokenizer()
    export_model(BERT(BERTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size)), tok, tmp_path / "hf")
    built = lmkit.api.build(["+objective=nsp", *BASE, f"init_from={tmp_path / 'hf'}"], tmp_path / "run")
    said = capsys.readouterr().out
    line = next(s for s in said.splitlines() if "initialised fresh" in s)
    assert "objective.pair_head.weight" in line and "pooler.dense.weight" in line
    assert built.module.model.pooler is not None


def test_unused_source_tensors_are_listed(tmp_path, capsys):
    tok = ByteTokenizer()
    head = {f"objective.pair_head.{k}": v for k, v in torch.nn.Linear(32, 2).state_dict().items()}
    export_model(BERT(BERTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size)), tok, tmp_path / "hf",
                 head_state=head)
    lmkit.api.build(["+objective=mlm", *BASE, f"init_from={tmp_path / 'hf'}"], tmp_path / "run")
    said = capsys.readouterr().out
    line = next(s for s in said.splitlines() if "not used" in s)
    assert "cls.seq_relationship.weight" in line and "bert.pooler.dense.weight" in line


def test_errors_one_line(trained, tmp_path, capsys):
    run_dir, hf_dir = trained
    cases = []
    # another architecture than the run's
    cases.append(([*TINY, f"init_from={hf_dir}", "+objective=mlm", "model=bert_tiny"], "holds a gpt model, but the run's model is bert"))
    # an unsupported family lists the supported ones
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 32}))
    cases.append(([*TINY, f"init_from={mistral}"], "model of type 'mistral', which lmkit cannot load; supported model types: gpt2 (gpt), bert (bert), albert (albert), t5 (t5), bart (bart)"))
    # a tensor of another shape names it and both shapes
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    state["transformer.wpe.weight"] = torch.zeros(32, 32)
    save_file(state, str(bad / "model.safetensors"))
    cases.append(([*TINY, f"init_from={bad}"], "tensor 'wpe.weight' has shape [32, 32] there but [64, 32]"))
    cases.append(([*TINY, f"init_from={tmp_path / 'nowhere'}"], "does not exist"))
    for i, (argv, expected) in enumerate(cases):
        assert lmkit.cli.main([*argv, f"hydra.run.dir={tmp_path / f'r{i}'}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (expected, err)


def test_init_from_a_bare_weights_file(trained, tmp_path, capsys):
    """A file of bare weights (torch.save(state_dict)) starts a run with the run's own settings: the weights
    hint of resume= (lmkit.checkpoint) points here."""
    from lmkit.checkpoint import load_checkpoint_file

    run_dir, _ = trained
    weights = {k.removeprefix("model."): v for k, v in
               load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"].items()}
    torch.save(weights, tmp_path / "weights.pt")
    built = lmkit.api.build([*TINY, f"init_from={tmp_path / 'weights.pt'}"], tmp_path / "run")
    assert "loaded 16 tensors" in capsys.readouterr().out
    assert same_state(weights, dict(built.module.model.state_dict())) == []


def test_resume_auto_with_init_from_restarts_from_the_checkpoint(trained, tmp_path, capsys):
    """The same command for the first start and every restart: the first loads the source, a restart resumes."""
    _, hf_dir = trained
    argv = [*TINY, f"init_from={hf_dir}", "resume=auto", f"hydra.run.dir={tmp_path / 'run'}"]
    assert lmkit.cli.main([*argv, "trainer.max_steps=2"]) == 0
    assert "loaded 16 tensors" in capsys.readouterr().out
    assert lmkit.cli.main([*argv, "trainer.max_steps=4"]) == 0
    said = capsys.readouterr().out
    assert "lmkit: resuming from" in said and "loaded 16 tensors" not in said
    assert "trained 2 steps (4 in total)" in said
