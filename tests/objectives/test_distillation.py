"""distillation (DistilBERT): each loss term against a hand computation, the teacher frozen and in eval
mode throughout training and absent from checkpoints, the student's KL to the teacher falling, the
student initialised from every other teacher layer exactly, and the bad inputs refused in one line."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from objective_helpers import text_blocks

from lmkit.api import build, load_run_config, run
from lmkit.errors import ConfigError

SMALL = ["model.n_head=2", "model.d_model=32", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=4",
         "trainer.val_batches=2", "trainer.progress_bar=false", "logger=none", "scheduler.warmup_steps=1",
         "callbacks=[]", "trainer.validate_at_start=false", "trainer.checkpoint_every_n_steps=1000"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A 4-layer BERT (30 steps: its predictions differ from a fresh student's) and a 2-layer GPT, with dropout 0.1."""
    root = tmp_path_factory.mktemp("teachers")
    run(["+objective=mlm", "model.n_layer=4", "model.dropout=0.1", "trainer.max_steps=30", "optimizer.lr=3e-3",
         "trainer.val_check_interval=30", *SMALL], root / "bert")
    run(["+objective=causal_lm", "model=gpt_tiny", "model.n_layer=2", "model.dropout=0.1", "trainer.max_steps=8",
         "trainer.val_check_interval=8", *SMALL], root / "gpt")
    return {"bert": root / "bert", "gpt": root / "gpt"}


def student(teachers, tmp_path, *extra, kind="bert"):
    """The built run of a 2-layer student of ``kind``'s teacher (nothing trained)."""
    model = [] if kind == "bert" else ["model=gpt_tiny"]
    return build(["+objective=distillation", f"objective.teacher={teachers[kind]}", "model.n_layer=2", *model,
                  "trainer.max_steps=4", "trainer.val_check_interval=4", *SMALL, *extra], tmp_path)


def batch_of(objective, seed=0):
    length, _ = objective.block_layout(32)
    return objective.make_collator()(text_blocks(4, length, seed), torch.Generator().manual_seed(seed))


def hand_kl(s_logits, t_logits, T):
    """Σ_v p_t (log p_t − log p_s) at temperature T, per row, in float64, from exp and sums."""
    def log_softmax(x):
        x = x.double() / T
        return x - x.exp().sum(-1, keepdim=True).log()

    lp_t, lp_s = log_softmax(t_logits), log_softmax(s_logits)
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1)


def forwards(objective, model, batch):
    """(student hidden, teacher hidden, student logits, teacher logits) at every position, run directly."""
    kw = objective._inputs(batch)
    teacher = objective.teacher.model
    with torch.no_grad():
        h_s, h_t = model(batch["input_ids"], **kw), teacher(batch["input_ids"], **kw)
        return h_s, h_t, model.logits(h_s), teacher.logits(h_t)


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_kl_term_is_t_squared_times_the_hand_kl(teachers, tmp_path, kind):
    built = student(teachers, tmp_path, "objective.alpha_lm=0", "objective.alpha_cos=0", "objective.alpha_ce=1",
                    "objective.temperature=3", "objective.init_from_teacher=false", kind=kind)
    objective, model = built.module.objective, built.module.model
    batch = batch_of(objective)
    out = objective.loss(model, batch)
    _, _, s, t = forwards(objective, model, batch)
    kl = hand_kl(s, t, 3.0)  # [B, T]: every position (encoder: DistilBERT's default; decoder: every next token)
    assert int(out.n_targets) == kl.numel() == batch["input_ids"].numel()
    assert math.isclose(float(out.loss_sum.detach()), 9 * float(kl.sum()), rel_tol=1e-5)
    assert math.isclose(float(out.logs["kl"]), float(kl.mean()), rel_tol=1e-5)
    # torch's KLDivLoss(batchmean) of DistilBERT's distiller.py, times T²
    ref = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s.flatten(0, 1) / 3, -1), F.softmax(t.flatten(0, 1) / 3, -1))
    assert math.isclose(float(out.loss_sum / out.n_targets), 9 * float(ref), rel_tol=1e-5)


def test_kl_on_masked_positions_only(teachers, tmp_path):
    built = student(teachers, tmp_path, "objective.alpha_lm=0", "objective.alpha_cos=0", "objective.kl_positions=masked",
                    "objective.init_from_teacher=false")
    objective, model = built.module.objective, built.module.model
    batch = batch_of(objective)
    out = objective.loss(model, batch)
    _, _, s, t = forwards(objective, model, batch)
    masked = batch["labels"] != -100
    assert int(out.n_targets) == int(masked.sum()) < masked.numel()
    assert math.isclose(float(out.loss_sum), 5 * 4 * float(hand_kl(s, t, 2.0)[masked].sum()), rel_tol=1e-5)


def test_cosine_term(teachers, tmp_path):
    built = student(teachers, tmp_path, "objective.alpha_lm=0", "objective.alpha_ce=0", "objective.alpha_cos=1",
                    "objective.init_from_teacher=false")
    objective, model = built.module.objective, built.module.model
    batch = batch_of(objective)
    out = objective.loss(model, batch)
    h_s, h_t, _, _ = forwards(objective, model, batch)
    a, b = h_s.flatten(0, 1).double(), h_t.flatten(0, 1).double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert math.isclose(float(out.loss_sum), float((1 - cos).sum()), rel_tol=1e-5)
    ref = torch.nn.CosineEmbeddingLoss()(h_s.flatten(0, 1), h_t.flatten(0, 1), torch.ones(a.shape[0]))
    assert math.isclose(float(out.logs["cos"]), float(ref), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_alpha_weighting_and_the_lm_term(teachers, tmp_path, kind):
    """loss / positions = α_ce·T²·KL + α_lm·LM + α_cos·(1 − cos), the LM term being mlm's / causal_lm's own loss."""
    from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig
    from lmkit.objectives.mlm import MLM, MLMConfig

    built = student(teachers, tmp_path, "objective.alpha_ce=3", "objective.alpha_lm=0.5", "objective.alpha_cos=7",
                    "objective.init_from_teacher=false", kind=kind)
    objective, model = built.module.objective, built.module.model
    batch = batch_of(objective)
    out = objective.loss(model, batch)
    lm_name = "mlm" if kind == "bert" else "clm"
    logs = {k: float(v) for k, v in out.logs.items()}
    expected = 3 * 4 * logs["kl"] + 0.5 * logs[lm_name] + 7 * logs["cos"]
    assert math.isclose(float(out.loss_sum / out.n_targets), expected, rel_tol=1e-5)
    plain = (MLM(MLMConfig(), built.tokenizer) if kind == "bert" else CausalLM(CausalLMConfig(), built.tokenizer))
    ref = plain.loss(model, batch)
    assert math.isclose(logs[lm_name], float(ref.loss_sum / ref.n_targets), rel_tol=1e-5)
    if kind == "gpt":  # the causal LM scores every position: perplexity and bits per byte stay meaningful
        assert math.isclose(float(out.nll_sum), float(ref.nll_sum), rel_tol=1e-5)


def test_init_from_teacher_copies_every_other_layer_exactly(teachers, tmp_path):
    teacher_state = torch.load(teachers["bert"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = student(teachers, tmp_path).module.model
    state = model.state_dict()
    for i, j in ((0, 0), (1, 2)):
        names = [k for k in state if k.startswith(f"blocks.{i}.")]
        assert names
        for k in names:
            assert torch.equal(state[k], teacher_state[f"model.blocks.{j}." + k[len(f"blocks.{i}."):]]), k
    for k in [k for k in state if not k.startswith("blocks.")]:  # embeddings, LM head, pooler
        assert torch.equal(state[k], teacher_state[f"model.{k}"]), k
    # an explicit choice of layers (DistilBERT took 0, 2, 4, 7, 9, 11 of 12)
    model = student(teachers, tmp_path / "b", "objective.teacher_layers=[1,3]").module.model
    for i, j in ((0, 1), (1, 3)):
        assert all(torch.equal(v, teacher_state[f"model.blocks.{j}." + k[len(f"blocks.{i}."):]])
                   for k, v in model.state_dict().items() if k.startswith(f"blocks.{i}."))


def test_init_only_when_shapes_allow(teachers, tmp_path, capsys):
    fresh = student(teachers, tmp_path, "model.d_model=64", "objective.alpha_cos=0").module.model
    teacher_wte = torch.load(teachers["bert"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["model.wte.weight"]
    assert fresh.wte.weight.shape[1] == 64 != teacher_wte.shape[1]
    assert "the student starts fresh: its shapes differ" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="init_from_teacher=true but the student's shapes differ"):
        student(teachers, tmp_path / "b", "model.d_model=64", "objective.alpha_cos=0", "objective.init_from_teacher=true")
    with pytest.raises(ConfigError, match="teacher layer 4 does not exist"):  # 3 layers at 2i need 5 teacher layers
        student(teachers, tmp_path / "c", "model.n_layer=3", "objective.init_from_teacher=true")
    off = student(teachers, tmp_path / "d", "objective.init_from_teacher=false").module.model
    assert not torch.equal(off.wte.weight, teacher_wte)


def test_teacher_frozen_in_eval_mode_and_not_checkpointed(teachers, tmp_path):
    import lightning as L

    built = student(teachers, tmp_path, "trainer.checkpoint_every_n_steps=2")
    objective = built.module.objective
    teacher = objective.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert teacher.model.cfg.dropout == 0.1
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert pl_module.training  # Lightning switched the student to train mode ...
            mb = batch["micro_batches"][0]
            pos = objective.positions(mb)
            kw = objective._inputs(mb)
            a = teacher(mb["input_ids"], pos, **kw)[1]
            b = teacher(mb["input_ids"], pos, **kw)[1]
            seen.append((not any(m.training for m in teacher.modules()), torch.equal(a, b)))  # ... never the teacher

    built.trainer.callbacks.append(Watch())
    built.trainer.fit(built.module, datamodule=built.datamodule)
    assert seen == [(True, True)] * 4
    torch.nn.Module.train(teacher, True)  # the control: in train mode its dropout does change the output
    mb = batch_of(objective)
    pos, kw = objective.positions(mb), objective._inputs(mb)
    assert not torch.equal(teacher(mb["input_ids"], pos, **kw)[1], teacher(mb["input_ids"], pos, **kw)[1])
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    optimizer_params = {id(p) for g in built.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    assert not any("teacher" in k for k in built.module.state_dict())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in built.module.model.state_dict()}


def test_teacher_runs_in_the_students_precision(teachers, tmp_path):
    built = student(teachers, tmp_path, "trainer.precision=bf16-true", "trainer.max_steps=1")
    built.trainer.fit(built.module, datamodule=built.datamodule)
    assert next(built.module.model.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in built.module.objective.teacher.parameters()} == {torch.bfloat16}


def test_students_kl_to_the_teacher_falls(teachers, tmp_path):
    """A fresh 2-layer student (no init from the teacher) for 16 steps: train/kl logged each step."""
    summary = run(["+objective=distillation", f"objective.teacher={teachers['bert']}", "model.n_layer=2",
                   "objective.init_from_teacher=false", "trainer.max_steps=16", "trainer.val_check_interval=16",
                   "optimizer.lr=3e-3", *SMALL, "logger=csv", "trainer.log_every_n_steps=1",
                   "trainer.validate_at_start=true"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    val = [float(r["val/kl"]) for r in rows if r.get("val/kl")]
    assert len(kl) == 16 and len(val) == 2
    assert sum(kl[-4:]) < 0.5 * sum(kl[:4]), kl
    assert val[1] < 0.5 * val[0], val
    assert summary["end"]["val/loss"] < summary["start"]["val/loss"]


# -- bad inputs: one line each ---------------------------------------------------------------------------------
def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_teacher_missing_or_unset(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=distillation", f"objective.teacher={tmp_path / 'nowhere'}"])
    assert "nowhere does not exist" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_run_config(["+objective=distillation"])
    assert "objective.teacher is not set" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        build(["+objective=distillation", f"objective.teacher={tmp_path / 'empty'}", *SMALL], tmp_path / "run")
    assert "not an lmkit run directory" in one_line(e)


def test_teacher_with_another_tokenizer(teachers):
    from lmkit.objectives.distillation import Distillation, DistillationConfig
    from lmkit.tokenizers.byte import ByteTokenizer

    with pytest.raises(ConfigError) as e:
        Distillation(DistillationConfig(teacher=str(teachers["bert"])), ByteTokenizer(num_sentinels=8))
    assert "was trained with another tokenizer" in one_line(e)


def test_the_run_takes_the_teachers_tokenizer(teachers, tmp_path):
    from lmkit.tokenizers.trained import load_tokenizer_file

    built = student(teachers, tmp_path, "tokenizer=bpe", "tokenizer.vocab_size=300")  # the teacher's byte tokenizer wins
    assert built.tokenizer.fingerprint() == load_tokenizer_file(teachers["bert"] / "tokenizer.json").fingerprint()


def test_student_of_another_kind(teachers, tmp_path):
    with pytest.raises(ConfigError) as e:
        student(teachers, tmp_path, "model=gpt_tiny")
    msg = one_line(e)
    assert "the student is a decoder" in msg and "is an encoder" in msg and "model=bert_tiny" in msg


def test_cosine_needs_equal_widths(teachers, tmp_path):
    with pytest.raises(ConfigError) as e:
        student(teachers, tmp_path, "model.d_model=64")
    assert "set model.d_model=32 or objective.alpha_cos=0" in one_line(e)


def test_experiment_preset(teachers):
    cfg = load_run_config(["experiment=distillation", f"objective.teacher={teachers['bert']}"])
    assert cfg.objective_component.name == "distillation" and cfg.model_component.name == "bert"
    assert (cfg.model.n_layer, cfg.model.pooler, cfg.model.type_vocab_size) == (2, False, 0)
    o = cfg.objective
    assert (o.temperature, o.alpha_ce, o.alpha_lm, o.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.trainer.gradient_clip) == (5e-4, 1e-6, 5.0)


def test_teacher_from_a_hugging_face_directory(teachers, tmp_path):
    """The BERT teacher exported to an HF directory: the same teacher logits, tokenizer and student init."""
    from lmkit.interop import export

    export(teachers["bert"], tmp_path / "hf")
    from_run = student(teachers, tmp_path / "a")
    from_hf = build(["+objective=distillation", f"objective.teacher={tmp_path / 'hf'}", "model.n_layer=2",
                     "trainer.max_steps=4", "trainer.val_check_interval=4", *SMALL], tmp_path / "b")
    assert from_hf.tokenizer.vocab_size == from_run.tokenizer.vocab_size
    a, b = from_run.module, from_hf.module
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("pooler."))  # the export drops the pooler
    batch = batch_of(a.objective)
    out_a, out_b = a.objective.loss(a.model, batch), b.objective.loss(b.model, batch)
    assert math.isclose(float(out_a.logs["kl"]), float(out_b.logs["kl"]), rel_tol=1e-4, abs_tol=1e-7)


def test_evaluate_scores_a_student_without_its_teacher(teachers, tmp_path):
    import shutil

    from lmkit.evaluation.run import EvalOptions, evaluate

    shutil.copytree(teachers["bert"], tmp_path / "teacher")
    run(["+objective=distillation", f"objective.teacher={tmp_path / 'teacher'}", "model.n_layer=2",
         "trainer.max_steps=2", "trainer.val_check_interval=2", *SMALL], tmp_path / "student")
    shutil.rmtree(tmp_path / "teacher")
    result = evaluate(tmp_path / "student", EvalOptions(max_tokens=1000))["corpus"]
    assert result["method"].startswith("objective mlm") and math.isfinite(result["loss"])
