"""Causal LM loss, metrics, and exact gradient accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from lmkit.api import build
from lmkit.objectives.base import IGNORE_INDEX, bits_per_byte


@pytest.fixture
def module(tmp_path, tiny):
    built = build(tiny, tmp_path)
    m = built.module
    m.manual_backward = lambda loss: loss.backward()  # no trainer attached in these unit tests
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_loss_is_mean_token_cross_entropy(module):
    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 33))
    batch = module.objective.make_collator()(blocks, torch.Generator())
    out = module.objective.loss(module.model, batch)
    logits = module.model.logits(module.model(blocks[:, :-1]))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1))
    assert out.n_targets.item() == 3 * 32
    assert (out.loss_sum / out.n_targets).item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.n_bytes.item() == 3 * 32  # byte tokenizer: one byte per token


def test_accumulated_gradient_equals_full_batch_with_unequal_target_counts(module):
    """HF #24725: averaging per micro-batch is wrong when micro-batches hold different target counts."""
    torch.manual_seed(0)
    collate = module.objective.make_collator()
    a = collate(torch.randint(0, 256, (2, 33)), torch.Generator())
    b = collate(torch.randint(0, 256, (2, 33)), torch.Generator())
    a["labels"] = a["labels"].clone()
    a["labels"][:, 5:] = IGNORE_INDEX  # a has 10 targets, b has 64
    full = {k: torch.cat([a[k], b[k]]) for k in a}

    module.zero_grad()
    loss_acc, targets_acc = module.forward_backward([a, b])
    g_acc = _grads(module)
    module.zero_grad()
    loss_full, targets_full = module.forward_backward([full])
    g_full = _grads(module)

    assert targets_acc.item() == targets_full.item() == 74
    assert loss_acc.item() == pytest.approx(loss_full.item(), rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], rtol=1e-4, atol=1e-7)

    # the naive per-micro-batch mean would differ: make sure this test can tell
    module.zero_grad()
    for mb in (a, b):
        out = module.objective.loss(module.model, mb)
        (out.loss_sum / out.n_targets / 2).backward()
    naive = _grads(module)
    assert any(not torch.allclose(naive[n], g_full[n], rtol=1e-3) for n in g_full)


def test_bits_per_byte_definition():
    assert bits_per_byte(nll_sum=math.log(2) * 100, n_bytes=100) == pytest.approx(1.0)
    assert bits_per_byte(nll_sum=10.0, n_bytes=5) == pytest.approx(10.0 / (5 * math.log(2)))


def test_validation_reports_perplexity_and_bpb(tmp_path, tiny):
    from lmkit.api import run

    s = run(tiny + ["trainer.max_steps=2"], tmp_path)
    end = s["end"]
    assert end["val/ppl"] == pytest.approx(math.exp(end["val/loss"]), rel=1e-4)
    assert end["val/bpb"] == pytest.approx(end["val/loss"] / math.log(2), rel=1e-4)  # byte tokens
