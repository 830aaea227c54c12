"""The evaluate verb: a run on its own validation split or any corpus, HF directories, encoders (objective loss,
pseudo-perplexity), tasks, JSON + table, the task_eval callback, and one-line errors."""
from __future__ import annotations

import json
import math

import pytest

import lmkit.cli
from lmkit_test_utils import one_error_line as _one_error


def _json(capsys):
    out = capsys.readouterr().out
    path = out.strip().splitlines()[-1].removeprefix("results: ")
    return out, json.loads(open(path).read())


def test_a_run_is_scored_on_its_validation_split_and_on_any_file(eval_run, tmp_path, capsys):
    from lmkit.evaluation.run import EvalOptions, evaluate

    capsys.readouterr()
    assert lmkit.cli.main(["evaluate", str(eval_run), "eval.max_tokens=300", f"eval.output={tmp_path / 'a.json'}"]) == 0
    out, result = _json(capsys)
    corpus = result["corpus"]
    assert corpus["split"] == "val" and corpus["tokens"] == 300 and corpus["seq_len"] == 32 and corpus["stride"] == 16
    assert corpus["perplexity"] == pytest.approx(math.exp(corpus["loss"]))
    assert corpus["bits_per_byte"] == pytest.approx(corpus["loss"] * 300 / (corpus["bytes"] * math.log(2)))
    assert f"{corpus['loss']:.4f}" in out and "bits/byte" in out
    api = evaluate(eval_run, EvalOptions(max_tokens=300))
    assert api["corpus"]["loss"] == pytest.approx(corpus["loss"], rel=1e-6)
    text = "To be, or not to be, that is the question.\n"
    (tmp_path / "doc.txt").write_text(text)
    assert lmkit.cli.main(["evaluate", str(eval_run), "data=text", f"data.path={tmp_path / 'doc.txt'}",
                           "eval.stride=32", f"eval.output={tmp_path / 'b.json'}"]) == 0
    _, result = _json(capsys)
    assert result["corpus"]["split"] == "all"
    assert result["corpus"]["tokens"] == len(text.encode()) + 1  # every byte and the document's <eos>


def test_an_exported_run_scores_the_same_as_the_run(eval_run, tmp_path, capsys):
    capsys.readouterr()
    assert lmkit.cli.main(["export", str(eval_run), str(tmp_path / "hf")]) == 0
    common = ["data=tinyshakespeare", "eval.max_tokens=200", "eval.seq_len=32"]
    assert lmkit.cli.main(["evaluate", str(eval_run), *common, f"eval.output={tmp_path / 'a.json'}"]) == 0
    _, ours = _json(capsys)
    assert lmkit.cli.main(["evaluate", str(tmp_path / "hf"), *common, f"eval.output={tmp_path / 'b.json'}"]) == 0
    _, theirs = _json(capsys)
    assert theirs["corpus"]["loss"] == pytest.approx(ours["corpus"]["loss"], abs=1e-5)


def test_tasks_are_scored_and_reported_with_chance(eval_run, tmp_path, capsys):
    capsys.readouterr()
    assert lmkit.cli.main(["evaluate", str(eval_run), "tasks=[shakespeare_next_line,arithmetic_2da]",
                           "eval.limit=6", "eval.num_fewshot=1", f"eval.output={tmp_path / 't.json'}"]) == 0
    out, result = _json(capsys)
    assert "corpus" not in result and result["num_fewshot"] == 1
    mc, gen = result["tasks"]["shakespeare_next_line"], result["tasks"]["arithmetic_2da"]
    assert mc["n"] == 6 and mc["chance"] == 0.25 and len(mc["loglikelihoods"]) == 24
    assert 0 <= mc["acc"] <= 1 and gen["n"] == 6 and len(gen["outputs"]) == 6
    assert "shakespeare_next_line" in out and "exact_match" in out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import torch

    from lmkit.interop.exporter import export_model
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.tokenizers.byte import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    path = tmp_path_factory.mktemp("bert") / "hf"
    export_model(BERT(BERTConfig(n_layer=1, n_head=2, d_model=32, vocab_size=tok.vocab_size, max_seq_len=32)), tok, path)
    return path


def test_an_encoder_is_scored_by_its_objective_or_pseudo_perplexity(bert_dir, tmp_path, capsys):
    capsys.readouterr()
    args = ["evaluate", str(bert_dir), "eval.max_tokens=256", "eval.seq_len=32"]
    assert lmkit.cli.main([*args, f"eval.output={tmp_path / 'a.json'}"]) == 0
    _, first = _json(capsys)
    assert first["corpus"]["method"].startswith("objective mlm") and "bits_per_byte" not in first["corpus"]
    assert 0 < first["corpus"]["tokens"] < 256  # only the masked tokens are predicted
    assert lmkit.cli.main([*args, f"eval.output={tmp_path / 'b.json'}"]) == 0
    _, again = _json(capsys)
    assert again["corpus"]["loss"] == first["corpus"]["loss"]  # the masking noise is seeded
    assert lmkit.cli.main([*args, "eval.pseudo_perplexity=true", "eval.max_tokens=40",
                           f"eval.output={tmp_path / 'c.json'}"]) == 0
    _, pppl = _json(capsys)
    assert pppl["corpus"]["method"] == "pseudo-perplexity" and pppl["corpus"]["tokens"] == 40


def test_bad_input_is_one_line(eval_run, bert_dir, tmp_path, capsys):
    run = str(eval_run)
    _one_error(capsys, ["evaluate", run, "eval.strid=3"], "Did you mean 'eval.stride'?")
    _one_error(capsys, ["evaluate", run, "tasks=[shakespeare_nextline]"], "Did you mean 'shakespeare_next_line'?")
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    _one_error(capsys, ["evaluate", run, f"tasks=[{tmp_path / 'bad.yaml'}]"], "is not valid YAML")
    _one_error(capsys, ["evaluate", str(bert_dir), "tasks=[arithmetic_2da]"], "this model is an encoder")
    _one_error(capsys, ["evaluate", run, "eval.split=test"], "eval.split=test")
    _one_error(capsys, ["evaluate", run, "eval.stride=0"], "eval.stride=0")
    _one_error(capsys, ["evaluate", run, "eval.seq_len=100"], "max_seq_len=64")
    _one_error(capsys, ["evaluate", str(tmp_path / "nothing")], "does not exist")
    _one_error(capsys, ["evaluate", run, "data=text"], "data.path is not set")
    _one_error(capsys, ["evaluate"], "evaluate needs a model")
    assert not list(tmp_path.glob("**/*.json"))  # nothing was written


def test_task_eval_callback_logs_tasks_during_training(tmp_path):
    from lmkit_test_utils import TINY

    run = tmp_path / "run"
    argv = [a for a in TINY if not a.startswith(("callbacks=", "logger="))]
    assert lmkit.cli.main([*argv, "logger=csv", "callbacks=[task_eval]",
                           "+callback_options.task_eval.every_n_steps=2", "+callback_options.task_eval.limit=4",
                           "+callback_options.task_eval.tasks=[shakespeare_next_line,shakespeare_last_word]",
                           f"hydra.run.dir={run}"]) == 0
    import csv

    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("tasks/shakespeare_next_line/acc")]
    assert [int(r["step"]) for r in logged] == [2, 4]
    assert all(0 <= float(r["tasks/shakespeare_last_word/acc"]) <= 1 for r in logged)


def test_task_eval_options_are_checked_before_training(tmp_path, capsys):
    from lmkit_test_utils import TINY

    _one_error(capsys, [*TINY, "callbacks=[task_eval]", "+callback_options.task_eval.tasks=[nope]",
                        f"hydra.run.dir={tmp_path / 'r'}"], "unknown task 'nope'")
    assert not (tmp_path / "r").exists()


def test_a_separate_validation_file_is_the_val_split_and_a_mixture_names_its_sources(eval_run, tmp_path, capsys):
    train, val = "Now is the winter of our discontent.\n" * 3, "Made glorious summer by this sun of York.\n"
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "val.txt").write_text(val)
    data = ["data=text", f"data.path={tmp_path / 'train.txt'}", f"data.val_path={tmp_path / 'val.txt'}"]
    capsys.readouterr()
    assert lmkit.cli.main(["evaluate", str(eval_run), *data, "eval.split=val", f"eval.output={tmp_path / 'v.json'}"]) == 0
    _, result = _json(capsys)
    assert result["corpus"]["split"] == "val" and result["corpus"]["tokens"] == len(val.encode()) + 1
    assert lmkit.cli.main(["evaluate", str(eval_run), *data, "eval.split=train", f"eval.output={tmp_path / 't.json'}"]) == 0
    _, result = _json(capsys)
    assert result["corpus"]["tokens"] == len(train.encode()) + 1  # data.path is all training text
    mixture = ["data=mixture", f"data.mixture=[{{source: text, path: {tmp_path / 'train.txt'}, weight: 1.0}}]"]
    _one_error(capsys, ["evaluate", str(eval_run), *mixture, "eval.split=val"], "eval.split=val of a data mixture")
