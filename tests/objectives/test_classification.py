"""objective=classification: heads read the right token, label-as-text scoring, metrics against
sklearn/scipy, regression, the speaker task, resume-exact example batches, and bad inputs."""
from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from objective_helpers import byte_tokenizer, tiny_model

from lmkit.api import build, run
from lmkit.data.examples import ExampleDataModule
from lmkit.data.sources import BUILTIN_CORPORA
from lmkit.data.speakers import build_speaker_task, speaker_records
from lmkit.errors import ConfigError, DataError
from lmkit.objectives.classification import Classification, ClassificationConfig

TEXTS = [("To be, or not to be", None), ("Now is the winter", "of our discontent"), ("O", "Romeo, Romeo! wherefore art thou"),
         ("Friends, Romans, countrymen, lend me your ears;", None)]

SMALL = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "data.seq_len=48", "data.batch_size=4",
         "trainer.progress_bar=false", "logger=none", "callbacks=[]", "scheduler.warmup_steps=1"]


def objective_for(kind: str, labels=("no", "yes"), **cfg) -> Classification:
    obj = Classification(ClassificationConfig(**cfg), byte_tokenizer(0))
    obj.kind, obj.seq_len = kind, 64
    obj.set_labels(None if cfg.get("regression") or cfg.get("num_labels") == 1 else list(labels))
    return obj


def examples(tok, targets):
    return [(np.array(tok.encode(a)), None if b is None else np.array(tok.encode(b)), y) for (a, b), y in zip(TEXTS, targets)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- heads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_decoder_head_reads_exactly_the_last_real_token(arch):
    obj = objective_for("decoder")
    tok = obj.tokenizer
    if arch == "llama":
        from lmkit.models.llama import Llama, LlamaConfig

        torch.manual_seed(0)
        model = Llama(LlamaConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=64, vocab_size=tok.vocab_size))
    else:
        model = tiny_model("gpt", tok.vocab_size)
    obj.attach(model)
    obj.eval(), model.eval()
    batch = obj.make_collator()(examples(tok, [0, 1, 1, 0]), torch.Generator())
    assert batch["padding_mask"].sum(1).tolist() == [len(t) for t in _framed_decoder(tok)]
    with torch.no_grad():
        got = obj.features(model, batch)
        for r, tokens in enumerate(_framed_decoder(tok)):  # brute force: each example alone, unpadded
            alone = model(torch.tensor([tokens]))[0]
            torch.testing.assert_close(got[r], alone[-1], atol=1e-5, rtol=1e-5)
            assert tokens[-1] == tok.eos_id
        torch.testing.assert_close(obj.forward_logits(model, batch), obj.head(got))


def _framed_decoder(tok):
    return [tok.encode(a) + ([] if b is None else [tok.sep_id] + tok.encode(b)) + [tok.eos_id] for a, b in TEXTS]


@pytest.mark.parametrize("arch", ["bert", "albert"])
def test_encoder_head_reads_the_pooled_cls(arch):
    obj = objective_for("encoder")
    tok = obj.tokenizer
    model = tiny_model(arch, tok.vocab_size)
    obj.attach(model)
    obj.eval(), model.eval()
    batch = obj.make_collator()(examples(tok, [0, 1, 1, 0]), torch.Generator())
    with torch.no_grad():
        got = obj.features(model, batch)
        for r, (a, b) in enumerate(TEXTS):
            first = [tok.cls_id, *tok.encode(a), tok.sep_id]
            second = [] if b is None else [*tok.encode(b), tok.sep_id]
            n = len(first) + len(second)
            assert batch["input_ids"][r, :n].tolist() == first + second
            assert batch["token_type_ids"][r, :n].tolist() == [0] * len(first) + [1] * len(second)
            alone = model(torch.tensor([first + second]), token_type_ids=torch.tensor([[0] * len(first) + [1] * len(second)]))
            pooled = torch.tanh(alone[0, 0] @ model.pooler.dense.weight.T + model.pooler.dense.bias)  # tanh(W h_[CLS] + b)
            torch.testing.assert_close(got[r], pooled, atol=1e-5, rtol=1e-5)


def test_pairs_are_truncated_longest_first():
    from lmkit.objectives.classification import truncate_pair

    a, b = list(range(10)), list(range(100, 104))
    assert truncate_pair(a, b, 10) == (list(range(6)), [100, 101, 102, 103])
    assert truncate_pair(a, b, 6) == ([0, 1, 2], [100, 101, 102])
    assert truncate_pair(a, None, 4) == ([0, 1, 2, 3], None)


@pytest.mark.parametrize("arch, start", [("t5", "<pad>"), ("bart", "<eos>")])
def test_label_as_text_prediction_is_the_most_likely_label_string(arch, start):
    labels = ["GLOUCESTER", "ROMEO", "JULIET"]
    obj = objective_for("encoder_decoder", labels, decoder_start_token=start)
    tok = obj.tokenizer
    model = tiny_model(arch, tok.vocab_size)
    obj.attach(model)
    obj.eval(), model.eval()
    batch = obj.make_collator()(examples(tok, [0, 2, 1, 1]), torch.Generator())
    with torch.no_grad():
        scores = obj.label_log_likelihoods(model, batch)
        by_hand = torch.zeros(len(TEXTS), len(labels))
        for r, (a, b) in enumerate(TEXTS):  # token by token, each example alone
            source = torch.tensor([tok.encode(a) + ([] if b is None else [tok.sep_id] + tok.encode(b)) + [tok.eos_id]])
            for c, name in enumerate(labels):
                target = tok.encode(name) + [tok.eos_id]
                for t in range(len(target)):
                    dec = torch.tensor([[tok.special_id(start)] + target[:t]])
                    logp = torch.log_softmax(model.logits(model(source, decoder_input_ids=dec))[0, -1], -1)
                    by_hand[r, c] += logp[target[t]]
        torch.testing.assert_close(scores, by_hand, atol=1e-4, rtol=1e-4)
        out = obj.loss(model, batch)  # validation: the metrics see argmax over the label strings
        expected = (by_hand.argmax(1) == batch["class_labels"]).float().mean()
        torch.testing.assert_close(out.logs["acc"].compute(), expected)
    # training target: the label's name and <eos>, teacher-forced after the start token
    gold = [tok.encode(labels[y]) + [tok.eos_id] for y in [0, 2, 1, 1]]
    for r, g in enumerate(gold):
        assert batch["labels"][r, :len(g)].tolist() == g and (batch["labels"][r, len(g):] == -100).all()
        assert batch["decoder_input_ids"][r, :len(g)].tolist() == [tok.special_id(start)] + g[:-1]


# -- metrics and regression ------------------------------------------------------------------------
def test_classification_metrics_equal_sklearn_over_the_whole_split():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 101)
    pred = np.where(rng.random(101) < 0.6, y, rng.integers(0, 4, 101))
    obj = objective_for("decoder", ["a", "b", "c", "d"])
    obj.attach(tiny_model("gpt", obj.tokenizer.vocab_size))
    for s in range(0, 101, 16):  # in batches, the last one short
        metrics = obj.update_metrics(torch.tensor(pred[s:s + 16]), torch.tensor(y[s:s + 16]))
    assert metrics["acc"].compute().item() == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert metrics["f1"].compute().item() == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert metrics["mcc"].compute().item() == pytest.approx(matthews_corrcoef(y, pred), abs=1e-6)


def test_regression_loss_and_metrics():
    from scipy.stats import pearsonr, spearmanr

    obj = objective_for("decoder", num_labels=1)
    assert obj.cfg.regression
    model = tiny_model("gpt", obj.tokenizer.vocab_size)
    obj.attach(model)
    assert obj.head.out_features == 1
    obj.eval(), model.eval()
    y = [0.5, 3.8, 2.0, 4.9]
    batch = obj.make_collator()(examples(obj.tokenizer, y), torch.Generator())
    assert batch["class_labels"].dtype == torch.float32
    with torch.no_grad():
        out = obj.loss(model, batch)
        pred = obj.head(obj.features(model, batch))[:, 0]
    target = torch.tensor(y)
    torch.testing.assert_close(out.loss_sum / out.n_targets, ((pred - target) ** 2).mean())
    p, t = pred.numpy(), np.array(y)
    assert out.logs["pearson"].compute().item() == pytest.approx(pearsonr(p, t)[0], abs=1e-5)
    assert out.logs["spearman"].compute().item() == pytest.approx(spearmanr(p, t)[0], abs=1e-5)
    assert out.logs["mse"].compute().item() == pytest.approx(float(((p - t) ** 2).mean()), rel=1e-5)


def test_a_run_logs_accuracy_f1_and_mcc_over_the_whole_validation_split(tmp_path):
    """val/acc, val/f1 and val/mcc of a validation equal sklearn's on the model's own predictions
    for every validation example (15 examples in batches of 4: not a mean of per-batch values)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rows = [{"text": f"line {i} " + "ab"[i % 2] * (i % 7), "label": ["x", "y", "z"][i % 3]} for i in range(50)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    built = build(["+objective=classification", "model=gpt_tiny", *SMALL, f"data.path={data}", "data.val_fraction=0.3",
                   "trainer.val_batches=0"], tmp_path / "run")
    built.trainer.validate(built.module, datamodule=built.datamodule, verbose=False)
    logged = {k: float(v) for k, v in built.trainer.callback_metrics.items()}
    obj, model = built.module.objective, built.module.model
    built.module.eval()  # Lightning leaves the module in training mode after validate (head dropout)
    preds, ys = [], []
    with torch.no_grad():
        for batch in built.datamodule.val_dataloader():
            mb = batch["micro_batches"][0]
            preds += obj.forward_logits(model, mb).argmax(-1).tolist()
            ys += mb["class_labels"].tolist()
    assert len(ys) == 15
    assert logged["val/acc"] == pytest.approx(accuracy_score(ys, preds), abs=1e-6)
    assert logged["val/f1"] == pytest.approx(f1_score(ys, preds, average="macro"), abs=1e-6)
    assert logged["val/mcc"] == pytest.approx(matthews_corrcoef(ys, preds), abs=1e-6)
    assert "val/ppl" not in logged


# -- data: labels, the speaker task, resume --------------------------------------------------------
def test_labels_are_inferred_sorted_and_recorded_in_the_run_config(tmp_path):
    rows = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_dir = tmp_path / "run"
    run(["+objective=classification", "model=bert_tiny", *SMALL, f"data.path={data}", "trainer.max_steps=1",
         "trainer.validate_at_start=false", "trainer.val_check_interval=1"], run_dir)
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run_dir / "config.yaml")
    assert list(saved.objective.labels) == ["1", "2", "10"]  # numbers in numeric order


def test_speaker_task_is_the_ten_most_frequent_speakers_lines(tmp_path):
    text = BUILTIN_CORPORA["tinyshakespeare"].read_text()
    counts, speaker = Counter(), None  # brute force: walk the corpus line by line
    for line in text.split("\n"):
        if not line.strip():
            speaker = None
        elif speaker is None and line.endswith(":"):
            speaker = line[:-1]
        elif speaker is not None:
            counts[speaker] += 1
    top = sorted(counts, key=lambda s: (-counts[s], s))[:10]
    path = build_speaker_task(tmp_path)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert Counter(r["label"] for r in records) == {s: counts[s] for s in top}
    assert records == speaker_records(text)  # deterministic
    assert build_speaker_task(tmp_path) == path and path.read_text() == "".join(json.dumps(r) + "\n" for r in records)


def _epoch(loader):
    """One pass of ``loader``: per step, its micro-batches' (input ids, padding mask, targets)."""
    return [[(mb["input_ids"], mb["padding_mask"], mb["class_labels"]) for mb in batch["micro_batches"]]
            for batch in loader]


def _same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_example_batches_resume_exactly(tmp_path):
    """A loader restored from the state saved after 3 steps yields the uninterrupted run's steps 3, 4 and then
    the next epoch's; every training example is used once per epoch."""
    rows = [{"text": f"example number {i}" + "!" * (i % 9), "label": "ab"[i % 2]} for i in range(44)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    overrides = ["+objective=classification", "model=gpt_tiny", *SMALL, f"data.path={data}", "data.grad_accum=2",
                 "data.val_fraction=0.1"]
    dm = build(overrides, tmp_path / "run").datamodule
    assert isinstance(dm, ExampleDataModule) and len(dm.train_set) == 40  # 5 steps of 2 × 4 per epoch
    steps = [0]
    dm.data_steps = lambda: steps[0]
    loader = dm.train_dataloader()
    first = _epoch(loader)
    rows_seen = {tuple(ids[m].tolist()) for step in first for ids, mask, _ in step for ids, m in zip(ids, mask)}
    assert len(first) == 5 and len(rows_seen) == 40
    steps[0] = 3
    state = loader.state_dict()  # what a checkpoint written after 3 steps holds
    steps[0] = 5
    second = _epoch(loader)

    fresh = build(overrides, tmp_path / "run2").datamodule
    fresh_steps = [0]
    fresh.data_steps = lambda: fresh_steps[0]
    resumed_loader = fresh.train_dataloader()
    resumed_loader.load_state_dict(state)
    resumed = _epoch(resumed_loader)
    fresh_steps[0] = 5
    resumed += _epoch(resumed_loader)
    _same(first[3:] + second, resumed)


# -- bad inputs: one line each ----------------------------------------------------------------------
def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_record_missing_its_label_names_file_line_and_its_fields(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                              {"text": "c", "category": "x"}])
    with pytest.raises(DataError) as e:
        build(["+objective=classification", *SMALL, f"data.path={data}"], tmp_path / "run")
    msg = _one_line(e)
    assert f"{data}:3" in msg and "'label'" in msg and "text, category" in msg and "objective.label_field" in msg


def test_a_csv_record_missing_its_text_names_file_line(tmp_path):
    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows([["a", "x"], ["b", "y"]])
    with pytest.raises(DataError) as e:
        build(["+objective=classification", *SMALL, f"data.path={data}"], tmp_path / "run")
    msg = _one_line(e)
    assert f"{data}:2" in msg and "'text'" in msg and "sentence, label" in msg and "objective.text_field" in msg


def test_a_label_outside_the_configured_classes_names_file_line_and_the_classes(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}] * 5 + [{"text": "b", "label": "neutral"}])
    with pytest.raises(DataError) as e:
        build(["+objective=classification", *SMALL, f"data.path={data}", "objective.labels=[neg,pos]"], tmp_path / "run")
    msg = _one_line(e)
    assert f"{data}:6" in msg and "'neutral'" in msg and "neg, pos" in msg


def test_a_validation_label_unseen_in_training_is_refused(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(18)] + [{"text": "z", "label": "c"}] * 2
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        build(["+objective=classification", *SMALL, f"data.path={data}"], tmp_path / "run")
    assert f"{data}:19" in _one_line(e) and "training split" in str(e.value)


@pytest.mark.parametrize("overrides, expected", [
    (["objective.labels=[a]"], "at least 2 classes"),
    (["objective.labels=[a,b,a]"], "'a' more than once"),
    (["objective.labels=[a,b]", "objective.num_labels=3"], "lists 2 classes but objective.num_labels=3"),
    (["objective.num_labels=1", "objective.labels=[a,b]"], "regression"),
    (["objective.num_labels=0"], "objective.num_labels must be >= 1"),
    (["objective.head_dropout=1.0"], "objective.head_dropout"),
    (["objective.label_field="], "objective.label_field must name a field"),
])
def test_bad_classification_options(overrides, expected, tmp_path):
    with pytest.raises(ConfigError) as e:
        build(["+objective=classification", *SMALL, *overrides], tmp_path / "run")
    assert expected in _one_line(e)


def test_regression_on_an_encoder_decoder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="encoder or decoder head"):
        build(["+objective=classification", "model=t5_tiny", *SMALL, "objective.regression=true"], tmp_path / "run")


# -- measured: does pretraining help? ---------------------------------------------------------------
def _final_val(run_dir) -> dict:
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("val/acc")]
    return {k: float(rows[-1][k]) for k in ("val/acc", "val/f1", "val/mcc", "val/loss")}


@pytest.mark.measure  # minutes; numbers in docs/objectives.md (python -m pytest -m measure)
def test_speaker_task_from_a_pretrained_run_vs_from_scratch(tmp_path, capsys):
    """gpt_tiny: 400 steps of causal LM on the corpus, then 300 steps of the fine-tuning recipe on the
    speaker task, vs the same 300 steps from a fresh initialisation. Numbers in docs/objectives.md."""
    quiet = ["model=gpt_tiny", "data.seq_len=64", "trainer.progress_bar=false", "logger=csv", "callbacks=[]",
             "trainer.validate_at_start=false"]
    run(["+objective=causal_lm", *quiet, "data.batch_size=32", "trainer.max_steps=400", "trainer.val_check_interval=400",
         "trainer.val_batches=4", "trainer.checkpoint_every_n_steps=400"], tmp_path / "pre")
    tune = ["+objective=classification", "experiment=classification", *quiet, "trainer.max_steps=300",
            "trainer.val_check_interval=300", "trainer.checkpoint_every_n_steps=300"]
    run(tune, tmp_path / "scratch")
    run([*tune, f"init_from={tmp_path / 'pre'}"], tmp_path / "pretrained")
    scratch, pretrained = _final_val(tmp_path / "scratch"), _final_val(tmp_path / "pretrained")
    with capsys.disabled():
        print(f"\nspeaker task, val split: scratch {scratch}, pretrained {pretrained}")
    records = speaker_records(BUILTIN_CORPORA["tinyshakespeare"].read_text())
    val = records[len(records) - int(len(records) * 0.1):]
    majority = max(Counter(r["label"] for r in val).values()) / len(val)  # always predicting one class
    # at this scale pretraining barely helps (measured: acc 0.178 vs 0.175, macro F1 0.105 vs 0.080): both
    # runs learn more than the majority class, neither by much; the comparison itself is reported, not asserted
    for result in (scratch, pretrained):
        assert result["val/acc"] > majority + 0.01 and result["val/mcc"] > 0.03, (result, majority)
