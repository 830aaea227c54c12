"""Objectives end to end: composition (default model, kinds), bad configs refused before
training, and a short run of each whose validation loss falls."""
from __future__ import annotations

import csv

import pytest
from objective_helpers import RUN

from lmkit.api import build, load_run_config, run
from lmkit.errors import ConfigError

DEFAULT_MODELS = {
    "mlm": "bert_tiny", "nsp": "bert_tiny", "sop": "albert_tiny", "span_bert": "bert_tiny",
    "span_corruption": "t5_tiny", "bart_denoising": "bart_tiny", "prefix_lm": "gpt_tiny",
    "prefix_lm_seq2seq": "t5_tiny", "ul2": "t5_tiny",
}
ARCH = {"bert_tiny": "bert", "albert_tiny": "albert", "t5_tiny": "t5", "bart_tiny": "bart", "gpt_tiny": "gpt"}


@pytest.mark.parametrize("name", sorted(DEFAULT_MODELS))
def test_objective_composes_with_its_default_model(name):
    cfg = load_run_config([f"+objective={name}"])
    assert cfg.objective_component.name == name and cfg.objective.name == name
    assert cfg.model_component.name == ARCH[DEFAULT_MODELS[name]]
    assert cfg.objective_component.meta["default_model"] == DEFAULT_MODELS[name]


def test_incompatible_architecture_is_refused_at_compose_time():
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=span_corruption", "model=gpt_tiny"])
    msg = str(e.value)
    assert "span_corruption" in msg and "gpt_tiny" in msg and "encoder_decoder" in msg
    assert "t5" in msg and "bart" in msg and "model=t5_tiny" in msg


def test_prefix_lm_trains_either_kind():
    assert load_run_config(["+objective=prefix_lm", "model=t5_tiny"]).model_component.name == "t5"
    with pytest.raises(ConfigError, match="encoder"):
        load_run_config(["+objective=prefix_lm", "model=bert_tiny"])


@pytest.mark.parametrize("overrides, expected", [
    (["+objective=span_corruption", "objective.noise_density=1.5"], "objective.noise_density must be strictly between 0 and 1"),
    (["+objective=span_corruption", "objective.noise_density=0"], "objective.noise_density must be strictly between 0 and 1"),
    (["+objective=span_corruption", "objective.mean_noise_span_length=0.5"], "objective.mean_noise_span_length must be a number >= 1"),
    (["+objective=span_bert", "objective.max_span_words=0"], "objective.max_span_words must be >= 1"),
    (["+objective=span_bert", "objective.mask_prob=1.0"], "objective.mask_prob must be strictly between 0 and 1"),
    (["+objective=mlm", "objective.mask_prob=-0.1"], "objective.mask_prob must be strictly between 0 and 1"),
    (["+objective=mlm", "objective.mode=dynamic"], "objective.mode must be one of exact, roberta, bernoulli"),
    (["+objective=mlm", "objective.mask_token_frac=0.95"], "exceeds 1"),
    (["+objective=bart_denoising", "objective.mask_ratio=1.0"], "objective.mask_ratio must be in [0, 1)"),
    (["+objective=bart_denoising", "objective.poisson_lambda=0"], "objective.poisson_lambda must be > 0"),
    (["+objective=ul2", "objective.denoisers=[{kind: X, mean_span: 3, density: 1.2}]"], "objective.denoisers.density"),
    (["+objective=ul2", "objective.denoisers=[{kind: X, mean_span: 0, density: 0.5}]"], "objective.denoisers.mean_span"),
    (["+objective=ul2", "objective.weights=[1, 2]"], "objective.weights must hold 7"),
    (["+objective=prefix_lm", "objective.form=encoder"], "objective.form must be one of"),
    (["+objective=nsp", "objective.negative_prob=2"], "objective.negative_prob must be in [0, 1]"),
])
def test_bad_objective_values_fail_at_compose_time(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(overrides)
    assert expected in str(e.value)


def test_too_short_sequences_fail_before_the_tokenizer_is_built(tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len=2 is too short for objective 'span_corruption'"):
        build(["+objective=span_corruption", "data.seq_len=2"], tmp_path)


def test_model_vocabulary_without_room_for_sentinels(tmp_path):
    # 266 = the byte tokenizer without sentinels: the sentinels the objective adds do not fit
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary"):
        build(["+objective=span_corruption", "model.vocab_size=266"], tmp_path)


METRICS = {"nsp": ("nsp_acc", "nsp_loss", "mlm_loss"), "sop": ("sop_acc", "sop_loss"), "span_bert": ("sbo_loss",)}


@pytest.mark.parametrize("name", sorted(DEFAULT_MODELS))
def test_short_run_loss_falls(name, tmp_path):
    summary = run([f"+objective={name}", *RUN, "logger=csv"], tmp_path)
    start, end = summary["start"]["val/loss"], summary["end"]["val/loss"]
    assert summary["steps"] == 25
    assert end == end and end < start, (start, end)  # finite, and lower
    if name in METRICS:  # the objective's own metrics reach the logs, in training and validation
        rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
        for key in METRICS[name]:
            assert any(r.get(f"train/{key}") for r in rows) and any(r.get(f"val/{key}") for r in rows), key


@pytest.mark.parametrize("name", ["causal_lm", "mlm"])
def test_document_masked_run_trains_on_many_documents(name, tmp_path):
    import json

    from objective_helpers import corpus_bytes

    paragraphs = bytes(corpus_bytes().astype("uint8")).decode().split("\n\n")
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs if p.strip()))
    summary = run([f"+objective={name}", "objective.document_mask=true", "data=jsonl", f"data.path={corpus}", *RUN],
                  tmp_path / "run")
    start, end = summary["start"]["val/loss"], summary["end"]["val/loss"]
    assert summary["steps"] == 25 and end == end and end < start, (start, end)


def test_document_mask_is_refused_by_objectives_without_it():
    with pytest.raises(ConfigError, match="document_mask"):
        load_run_config(["+objective=span_corruption", "objective.document_mask=true"])
