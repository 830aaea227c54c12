"""``model.compile=true`` (torch.compile with inductor) with every built-in architecture and objective.

The compiled forward must give the eager loss and gradients, train through the full loop
(validation switches to eval mode, which recompiles), and save checkpoints that resume
with or without compilation.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lmkit.api import build, run
from lmkit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent / "objectives"))
from objective_helpers import RUN  # noqa: E402
from test_resume import step_losses  # noqa: E402

CASES = [
    ("causal_lm", "gpt_tiny"), ("mlm", "bert_tiny"), ("mlm", "albert_tiny"), ("nsp", "bert_tiny"),
    ("sop", "albert_tiny"), ("span_bert", "bert_tiny"), ("span_corruption", "t5_tiny"),
    ("bart_denoising", "bart_tiny"), ("prefix_lm", "gpt_tiny"), ("prefix_lm_seq2seq", "t5_tiny"),
    ("ul2", "t5_tiny"),
]


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    out = module.objective.loss(module.model, batch)
    (out.loss_sum / out.n_targets).backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective, model", CASES)
def test_compiled_model_gives_eager_loss_and_gradients(objective, model, tmp_path):
    built = build([f"+objective={objective}", f"model={model}", *RUN, "model.compile=true", "model.dropout=0.0"],
                  tmp_path)
    module, dm = built.module, built.datamodule
    assert module.model._compiled_call_impl is not None  # compiled in place: parameter names unchanged
    assert not any("_orig_mod" in n for n in module.state_dict())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))["micro_batches"][0]
    torch._dynamo.reset()  # a fresh compilation, not a cache hit from an earlier test
    torch._dynamo.utils.counters.clear()
    compiled_loss, compiled_grads = _loss_and_grads(module, batch)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])  # one whole graph per forward
    compiled_impl, module.model._compiled_call_impl = module.model._compiled_call_impl, None
    eager_loss, eager_grads = _loss_and_grads(module, batch)
    module.model._compiled_call_impl = compiled_impl
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_run_matches_eager_run_and_resumes(tmp_path, tiny):
    common = tiny + ["logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3",
                     "trainer.val_check_interval=3", "data.batch_size=8", "scheduler.decay_steps=6"]
    eager = run(common + ["trainer.max_steps=6"], tmp_path / "eager")
    run(common + ["trainer.max_steps=3", "model.compile=true"], tmp_path / "compiled")
    resumed = run(common + ["trainer.max_steps=6", "model.compile=true", f"resume={tmp_path / 'compiled'}"],
                  tmp_path / "resumed")
    assert resumed["steps"] == 6
    a = step_losses(tmp_path / "eager")
    b = {**step_losses(tmp_path / "compiled"), **step_losses(tmp_path / "resumed")}
    assert sorted(b) == sorted(a) == list(range(6))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}"
    assert resumed["end"]["val/loss"] == pytest.approx(eager["end"]["val/loss"], rel=1e-4)


@pytest.mark.parametrize("override, expected", [
    ("trainer.compile_backend=indcutor", "Did you mean 'inductor'?"),
    ("trainer.compile_mode=fastest", "trainer.compile_mode must be one of default, reduce-overhead"),
])
def test_bad_compile_options_are_refused(override, expected, tmp_path, tiny):
    with pytest.raises(ConfigError, match=expected):
        build(tiny + ["model.compile=true", override], tmp_path)
