"""objective=bilm (ELMo): the loss against two LSTM LMs run by hand (with padding), the windows,
the fused path, a CLI run, the refusals (other architectures, export, generate), and the scalar
mix trained downstream by classification from a bilm run."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from objective_helpers import byte_tokenizer, gen, text_blocks

from lmkit_test_utils import TINY, one_error_line

from lmkit.api import run
from lmkit.errors import ConfigError
from lmkit.models.elmo import ELMo, ELMoConfig, token_char_table
from lmkit.objectives.bilm import BiLM, BiLMConfig
from lmkit.objectives.classification import Classification, ClassificationConfig

ELMO_TINY = [o for o in TINY if not o.startswith("model.n_head")]  # an LSTM has no heads


def tiny_elmo(vocab_size: int, **kw) -> ELMo:
    torch.manual_seed(0)
    # embeddings of std 1 (not 0.02): predictions far from uniform, so that a wrong target shows
    return ELMo(ELMoConfig(**{"vocab_size": vocab_size, "n_layer": 2, "d_model": 16, "d_hidden": 32, "init_std": 1.0,
                              **kw})).eval()


def lm_by_hand(lstms, x: torch.Tensor) -> torch.Tensor:
    """Top states of a stack of the model's nn.LSTM layers called directly on one row x [T, D] (residual
    around every layer but the first): an ordinary left-to-right LSTM LM."""
    h = x[None]
    for i, lstm in enumerate(lstms):
        y, _ = lstm(h)
        h = y + h if i > 0 else y
    return h[0]


def bilm_nll_by_hand(model: ELMo, row: torch.Tensor) -> tuple[float, float, int]:
    """(Σ forward NLL, Σ backward NLL, predictions per direction) of one unpadded row, position by position:
    the forward LM reads the row, the backward LM the reversed row."""
    E = model.output_embedding()
    x = model.embed(row[None])[0]
    fwd = lm_by_hand(model.fwd_lstms, x)
    bwd = lm_by_hand(model.bwd_lstms, x.flip(0)).flip(0)
    T = row.shape[0]
    f = sum(-torch.log_softmax(fwd[t] @ E.T, -1)[row[t + 1]] for t in range(T - 1))
    b = sum(-torch.log_softmax(bwd[t] @ E.T, -1)[row[t - 1]] for t in range(1, T))
    return float(f), float(b), T - 1


# -- the loss -----------------------------------------------------------------------------------------
def test_windows_score_each_token_once_per_direction():
    tok = byte_tokenizer(0)
    obj = BiLM(BiLMConfig(), tok)
    assert obj.block_layout(32) == (33, 32)  # stride 32: window k's last token is window k+1's first
    blocks = text_blocks(2, 33)
    batch = obj.make_collator()(blocks, gen())
    assert torch.equal(batch["input_ids"], blocks)
    assert torch.equal(batch["fwd_labels"], blocks[:, 1:]) and torch.equal(batch["bwd_labels"], blocks[:, :-1])
    assert int(obj.count_targets(batch)) == 2 * 2 * 32


def test_loss_equals_two_lstm_lms_by_hand():
    tok = byte_tokenizer(0)
    obj = BiLM(BiLMConfig(), tok)
    model = tiny_elmo(tok.vocab_size)
    blocks = text_blocks(3, 17)
    with torch.no_grad():
        out = obj.loss(model, obj.make_collator()(blocks, gen()))
        rows = [bilm_nll_by_hand(model, r) for r in blocks]
    f, b, n = (sum(r[k] for r in rows) for k in range(3))
    assert int(out.n_targets) == 2 * n == 2 * 3 * 16
    assert float(out.loss_sum) == pytest.approx(f + b, rel=1e-5)
    assert float(out.nll_sum) == pytest.approx(f + b, rel=1e-5)
    assert float(out.logs["fwd_nll"]) == pytest.approx(f / n, rel=1e-5)
    assert float(out.logs["bwd_nll"]) == pytest.approx(b / n, rel=1e-5)
    assert int(out.n_bytes) == 2 * n  # byte tokens: one byte per prediction, both directions


def test_padded_rows_score_only_their_real_tokens():
    """Right-padded rows of lengths 17, 9 and 4: the loss is that of each row alone, both directions."""
    tok = byte_tokenizer(0)
    obj = BiLM(BiLMConfig(), tok)
    model = tiny_elmo(tok.vocab_size)
    blocks = text_blocks(3, 17)
    lengths = torch.tensor([17, 9, 4])
    mask = torch.arange(17)[None] < lengths[:, None]
    batch = obj.make_collator()(blocks.masked_fill(~mask, tok.pad_id), gen())
    batch["padding_mask"] = mask
    with torch.no_grad():
        out = obj.loss(model, batch)
        rows = [bilm_nll_by_hand(model, blocks[i, :L]) for i, L in enumerate(lengths.tolist())]
    f, b, n = (sum(r[k] for r in rows) for k in range(3))
    assert int(out.n_targets) == int(obj.count_targets(batch)) == 2 * n == 2 * (16 + 8 + 3)
    assert float(out.loss_sum) == pytest.approx(f + b, rel=1e-5)
    assert float(out.logs["bwd_nll"]) == pytest.approx(b / n, rel=1e-5)


def test_chunked_softmax_equals_the_plain_one():
    tok = byte_tokenizer(0)
    model = tiny_elmo(tok.vocab_size)
    batch = BiLM(BiLMConfig(), tok).make_collator()(text_blocks(2, 17), gen())
    plain = BiLM(BiLMConfig(), tok).loss(model, batch)
    fused = BiLM(BiLMConfig(chunked_ce=5), tok).loss(model, batch)
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)


def test_attach_freezes_the_task_mix_and_reads_the_tokenizer_chars():
    tok = byte_tokenizer(3)
    model = tiny_elmo(tok.vocab_size + 5, char_cnn=True, tie_embeddings=False, char_filters=[[1, 4]], max_chars=8)
    model.token_chars.zero_()
    BiLM(BiLMConfig(), tok).attach(model)
    assert not any(p.requires_grad for p in model.mix_parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("mix_"))
    assert torch.equal(model.token_chars, token_char_table(tok, tok.vocab_size + 5, 8))


# -- runs and refusals --------------------------------------------------------------------------------
def _val_rows(run_dir) -> list[dict]:
    return [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("val/loss")]


@pytest.fixture(scope="module")
def bilm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bilm") / "run"
    run(["+objective=bilm", *ELMO_TINY, "trainer.max_steps=8", "trainer.val_check_interval=8", "logger=csv"], run_dir)
    return run_dir


def test_cli_run_lowers_both_directions_losses(bilm_run):
    """val/loss is the mean of the two directions' NLL (equal target counts), val/ppl its exp."""
    first, last = _val_rows(bilm_run)[0], _val_rows(bilm_run)[-1]
    for row in (first, last):
        fwd, bwd, loss = float(row["val/fwd_nll"]), float(row["val/bwd_nll"]), float(row["val/loss"])
        assert loss == pytest.approx((fwd + bwd) / 2, rel=1e-5)
        assert float(row["val/ppl"]) == pytest.approx(math.exp(loss), rel=1e-4)
    assert float(last["val/fwd_nll"]) < float(first["val/fwd_nll"]) - 0.1
    assert float(last["val/bwd_nll"]) < float(first["val/bwd_nll"]) - 0.1


@pytest.mark.parametrize("model, expected", [
    ("gpt_tiny", "needs an encoder architecture, but model 'gpt_tiny' is of kind decoder"),
    ("bert_tiny", "needs an architecture that accepts bilm_states"),
])
def test_bilm_on_another_architecture_is_refused_naming_the_elmo_presets(capsys, model, expected):
    one_error_line(capsys, ["+objective=bilm", f"model={model}"], expected)
    one_error_line(capsys, ["+objective=bilm", f"model={model}"], "elmo_base, elmo_small, elmo_tiny")


def test_char_cnn_with_a_tied_softmax_is_refused_in_one_line(capsys):
    one_error_line(capsys, ["+objective=bilm", "model.char_cnn=true"], "set model.tie_embeddings=false")


def test_export_and_generate_refuse_an_elmo_run(bilm_run, tmp_path):
    from lmkit.generation import load_for_generation
    from lmkit.interop.exporter import export

    with pytest.raises(ConfigError, match="no Hugging Face export for architecture 'elmo'"):
        export(bilm_run, tmp_path / "hf")
    with pytest.raises(ConfigError, match="an encoder: it cannot generate text"):
        load_for_generation(bilm_run)


def test_classification_from_a_bilm_run_trains_the_scalar_mix(bilm_run, tmp_path):
    """Fine-tuning reads forward() (the scalar mix, pooled at [CLS]); starting from the bilm run, whose
    mix was frozen at s = 0, γ = 1, the classification run moves s and γ."""
    rows = [{"text": f"line {i} " + "ab"[i % 2] * (1 + i % 5), "label": "xy"[i % 2]} for i in range(40)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pre = torch.load(bilm_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not pre["model.mix_weights"].any() and float(pre["model.mix_gamma"]) == 1.0
    out = tmp_path / "cls"
    run(["+objective=classification", "model=elmo_tiny", f"init_from={bilm_run}", f"data.path={data}",
         "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=4",
         "trainer.val_batches=2", "trainer.progress_bar=false", "logger=csv", "callbacks=[]",
         "scheduler.warmup_steps=1"], out)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(state["model.mix_weights"], pre["model.mix_weights"])
    assert float(state["model.mix_gamma"]) != 1.0
    assert "val/acc" in _val_rows(out)[-1]


def test_classification_head_reads_the_mix_at_the_first_token():
    """The encoder head of classification reads pooled(forward()): the mix at [CLS], padding-independent."""
    tok = byte_tokenizer(0)
    model = tiny_elmo(tok.vocab_size)
    obj = Classification(ClassificationConfig(), tok)
    obj.kind, obj.seq_len = "encoder", 32
    obj.set_labels(["no", "yes"])
    obj.attach(model)
    ids = torch.tensor([[tok.cls_id, 65, 66, tok.sep_id, tok.pad_id], [tok.cls_id, 67, 68, 69, tok.sep_id]])
    mask = ids != tok.pad_id
    batch = {"input_ids": ids, "padding_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        feats = obj.features(model, batch)
        alone = model(ids[:1, :4])[:, 0]
    torch.testing.assert_close(feats[0], alone[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feats, model(ids, padding_mask=mask)[:, 0])
