"""Single-process tests: registration, config checks, splitting, the stage machinery (no process group)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lmkit.errors import ConfigError
from pp_common import TINY, add_aux_losses, add_objective_logs, reference_step


def test_registered_as_third_party_plugin():
    from lmkit.api import load_run_config
    from lmkit.plugins import get_plugin_manager
    from lmkit_pipeline.config import PipelineConfig

    pm = get_plugin_manager()
    component = pm.get("strategy", "pipeline")
    assert component.provider == "lmkit-pipeline"
    assert any(d.endswith("lmkit_pipeline/conf") for d in pm.config_dirs())
    run = load_run_config(["strategy=pipeline"])
    assert isinstance(run.strategy, PipelineConfig)
    assert (run.strategy.pp_size, run.strategy.schedule, run.strategy.split) == (2, "1f1b", None)
    run = load_run_config(["strategy=pipeline", "strategy.schedule=zbv_zero_bubble", "strategy.stages_per_rank=2",
                           "strategy.split=[1,1,1,1]"])
    assert run.strategy.split == [1, 1, 1, 1]


@pytest.mark.parametrize("overrides, message", [
    (["strategy.schedule=pipedream"], "unknown strategy.schedule 'pipedream'"),
    (["strategy.schedule=gpipe", "strategy.stages_per_rank=2"], "needs strategy.stages_per_rank=1"),
    (["strategy.schedule=zbv_zero_bubble"], "needs strategy.stages_per_rank=2"),
    (["strategy.split=[1,2,1]"], "strategy.split has 3 entries but there are 2 stages"),
    (["strategy.split=[0,4]"], "positive number of blocks"),
    (["strategy.n_microbatches=1"], "at least one micro-batch per stage"),
    (["strategy.dp_mode=fsdp"], "FSDP2 sharding inside pipeline stages) is not supported"),
    (["strategy.pp_sise=2"], "Did you mean 'strategy.pp_size'"),
])
def test_config_errors(overrides, message):
    from lmkit.api import load_run_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(["strategy=pipeline"] + overrides)


@pytest.mark.parametrize("overrides, message", [
    (["strategy.pp_size=4", "strategy.stages_per_rank=2", "strategy.schedule=interleaved_1f1b",
      "trainer.devices=4"], "needs at least one transformer block per stage: pp_size 4 × stages_per_rank 2 = 8 stages"),
    (["data.batch_size=6", "strategy.n_microbatches=4", "trainer.devices=2"],
     r"n_microbatches=4 does not divide the 6 rows of one step .* among \[1, 2, 3, 6\]"),
    (["strategy.split=[1,2]", "trainer.devices=2"], "assigns 3 blocks, but the model has 4"),
    (["trainer.devices=3"], "pp_size=2 does not divide the 3 processes"),
    (["strategy.dp_size=2", "trainer.devices=2"], "pp_size=2 × strategy.dp_size=2 = 4 processes, but the run has 2"),
    (["data.batch_ramp_steps=10", "data.grad_accum=4", "trainer.devices=2"], "batch_ramp_steps must be 0"),
    (["trainer.precision=16-mixed", "trainer.devices=2"], "does not support trainer.precision=16-mixed"),
])
def test_refused_before_any_process_group(tmp_path, overrides, message):
    """What needs the model or the data is refused while building it: no process group, no launch."""
    from lmkit.api import build

    with pytest.raises(ConfigError, match=message):
        build(TINY + ["strategy=pipeline", "data.batch_size=4"] + overrides, tmp_path)
    assert not (dist.is_available() and dist.is_initialized())


def test_encoder_decoder_refused():
    from lmkit.models.t5 import T5, T5Config
    from lmkit_pipeline import plugin

    from lmkit.config.schema import DataConfig, TrainerConfig
    from lmkit_pipeline.config import PipelineConfig

    model = T5(T5Config(n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=16, vocab_size=40))
    run = SimpleNamespace(strategy=PipelineConfig(), data=DataConfig(batch_size=4), model=SimpleNamespace(),
                          trainer=TrainerConfig(devices=2))
    with pytest.raises(ConfigError, match="encoder_decoder"):
        plugin.lmkit_configure_model(model=model, run=run)


def test_balanced_split():
    from lmkit_pipeline.split import balanced_split

    assert balanced_split([10] * 4, 2) == [2, 2]
    assert balanced_split([10] * 8, 4) == [2, 2, 2, 2]
    assert balanced_split([10, 10, 10, 30], 2) == [3, 1]
    assert balanced_split([10] * 6, 3, first_extra=10, last_extra=10) == [2, 2, 2]
    assert balanced_split([10] * 5, 2, first_extra=15) == [2, 3]  # the embedding stage gets fewer blocks
    assert balanced_split([1] * 3, 3) == [1, 1, 1]
    with pytest.raises(ValueError):
        balanced_split([1, 1], 3)


def _module_and_batches(tmp_path, extra=()):
    from lmkit.api import build, load_run_config

    overrides = TINY + ["data.batch_size=2", "data.grad_accum=4", "trainer.devices=1"] + list(extra)
    built = build(overrides, tmp_path)
    micro_batches = next(iter(built.datamodule.train_dataloader()))["micro_batches"]
    val_batch = next(iter(built.datamodule.val_dataloader()))["micro_batches"][0]
    return built.module, load_run_config(overrides), micro_batches, val_batch


def _pipeline_grads(lm, run, micro_batches, val_batch, **cfg):
    from lmkit_pipeline.config import PipelineConfig
    from lmkit_pipeline.runtime import PipelineRuntime

    runtime = PipelineRuntime(PipelineConfig(**cfg))
    runtime.setup(lm, run)
    lm._aux_logs = {}
    loss_sum, n = runtime.forward_backward(lm, micro_batches)
    grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    val = runtime.evaluate(lm, val_batch)
    return runtime, float(loss_sum / n), grads, val


@pytest.mark.parametrize("split, aux", [(None, False), ([1, 3], False), ([2, 1, 1], True)])
def test_stages_in_one_process_match_the_model(tmp_path, split, aux):
    """pp_size=1 runs the stages one after another: the stage machinery without communication."""
    import copy

    lm, run, mbs, val_batch = _module_and_batches(tmp_path)
    if aux:  # auxiliary losses of modules inside blocks, and metrics the objective reports
        add_aux_losses(lm.model)
        add_objective_logs(lm.objective)
    ref = reference_step(copy.deepcopy(lm), mbs, val_batch)
    n_stages = len(split) if split else 2
    runtime, loss, grads, val = _pipeline_grads(lm, run, mbs, val_batch, pp_size=1, stages_per_rank=n_stages,
                                                schedule="interleaved_1f1b", n_microbatches=4, split=split,
                                                eval_microbatches=2 if aux else None)
    assert runtime.sizes == (split or [2, 2])
    assert loss == pytest.approx(ref["loss"], abs=1e-5)
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert float(val.loss_sum / val.n_targets) == pytest.approx(ref["val_loss"], abs=1e-5)
    assert float(val.nll_sum) == pytest.approx(ref["val_nll"], rel=1e-6)
    if aux:
        assert set(lm._aux_logs) == {"toy_aux", "label_mean"}
        for name in lm._aux_logs:
            assert float(lm._aux_logs[name]) == pytest.approx(ref["aux_logs"][name], rel=1e-5)
        assert float(val.logs["label_mean"]) == pytest.approx(ref["val_logs"]["label_mean"], rel=1e-6)
    # the tied embedding is owned by the first and the last stage, the final norm by the last only
    first, last = (set(map(id, ps)) for ps in (runtime.stage_params[0], runtime.stage_params[-1]))
    assert id(lm.model.wte.weight) in first & last
    assert id(lm.model.ln_f.weight) in last - first


def _encoder_module(kind: str, objective):
    from lmkit.models.albert import ALBERT, ALBERTConfig
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.module import LMModule

    V = objective.vocab_size
    torch.manual_seed(0)
    if kind == "bert":
        model = BERT(BERTConfig(n_layer=4, n_head=4, d_model=32, d_ff=64, max_seq_len=32, vocab_size=V))
    else:
        model = ALBERT(ALBERTConfig(n_layer=4, n_head=4, d_model=32, d_ff=64, embedding_size=16, max_seq_len=32,
                                    vocab_size=V))
    return LMModule(model, objective, optimizer_factory=lambda groups: torch.optim.AdamW(groups),
                    scheduler_factory=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                    weight_decay=0.1)


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_encoder_stages_through_the_contract(tmp_path, kind):
    """Encoders are cut through the same contract: embedding LayerNorm on stage 0, MLM head + bias on the
    last stage, an unused pooler kept but untrained, ALBERT's shared block weights in every stage."""
    import copy

    gpt, _, mbs, val_batch = _module_and_batches(tmp_path)
    lm = _encoder_module(kind, gpt.objective)
    ref = reference_step(copy.deepcopy(lm), mbs, val_batch)
    run = SimpleNamespace(data=SimpleNamespace(seq_len=16, batch_size=2, grad_accum=4, batch_ramp_steps=0),
                          trainer=SimpleNamespace(precision="32"), model=SimpleNamespace(compile=False))
    runtime, loss, grads, val = _pipeline_grads(lm, run, mbs, val_batch, pp_size=1, stages_per_rank=2,
                                                schedule="interleaved_1f1b", n_microbatches=4)
    assert loss == pytest.approx(ref["loss"], abs=1e-5)
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert float(val.nll_sum) == pytest.approx(ref["val_nll"], rel=1e-5)
    first, last = (set(map(id, ps)) for ps in (runtime.stage_params[0], runtime.stage_params[-1]))
    m = lm.model
    assert id(m.ln_emb.weight) in first and id(m.ln_emb.weight) not in last
    assert id(m.lm_bias) in last and id(m.lm_bias) not in first
    if kind == "bert":
        assert id(m.head.dense.weight) in last
        assert all(id(p) not in first | last for p in m.pooler.parameters())
    else:
        shared = {id(p) for p in m.transformer_blocks()[0].parameters()} & {id(p) for p in m.transformer_blocks()[-1].parameters()}
        assert shared and shared <= first & last
