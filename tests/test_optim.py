"""Optimizers, parameter groups and LR schedules against their definitions."""
from __future__ import annotations

import math

import pytest
import torch

from lmkit.api import build
from lmkit.optim.optimizers import OptimizerConfig, build_adafactor
from lmkit.optim.schedulers import WarmupDecay


def test_adamw_skips_weight_decay_on_biases_norms_embeddings(tmp_path, tiny):
    built = build(tiny + ["optimizer=adamw", "optimizer.weight_decay=0.1"], tmp_path)
    opt = built.module.configure_optimizers()["optimizer"]
    by_id = {id(p): n for n, p in built.module.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in decayed)
    assert any(n.endswith("bias") for n in plain) and any("ln_" in n for n in plain)
    assert "model.wte.weight" in plain and "model.wpe.weight" in plain
    assert isinstance(opt, torch.optim.AdamW)


def test_adafactor_keeps_factored_second_moments():
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = build_adafactor([{"params": [w]}], OptimizerConfig(name="adafactor", lr=1e-2))
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    row, col = state["row_var"], state["col_var"]
    assert row.numel() + col.numel() == 64 + 32  # O(m + n), not O(m·n)
    assert "exp_avg" not in state  # no first moment


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adafactor"])
def test_each_optimizer_trains(tmp_path, tiny, optimizer):
    from lmkit.api import run

    summary = run(tiny + [f"optimizer={optimizer}", "trainer.max_steps=6", "trainer.val_check_interval=6"], tmp_path)
    assert summary["steps"] == 6
    assert summary["end"]["val/loss"] < summary["start"]["val/loss"]


def test_warmup_then_cosine_to_floor():
    f = WarmupDecay("cosine", warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_schedules():
    lin = WarmupDecay("linear", warmup=0, total=100, floor=0.0)
    assert lin(0) == pytest.approx(1.0) and lin(50) == pytest.approx(0.5) and lin(100) == pytest.approx(0.0)
    const = WarmupDecay("constant", warmup=4, total=100, floor=0.0)
    assert const(1) == pytest.approx(0.5) and const(50) == 1.0


def test_scheduler_is_stepped_per_optimizer_step(tmp_path, tiny):
    from lmkit.api import run

    summary = run(tiny + ["scheduler=linear", "scheduler.warmup_steps=0", "scheduler.min_lr_ratio=0.0",
                          "trainer.max_steps=4", "logger=csv", "trainer.log_every_n_steps=1"], tmp_path)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert summary["steps"] == 4
    assert lrs == pytest.approx([3e-3 * f for f in (0.75, 0.5, 0.25, 0.0)])


@pytest.mark.parametrize("optimizer, flags, expected", [
    ("adamw", ["optimizer.fused=true"], {"fused": True}),
    ("adam", ["optimizer.fused=true"], {"fused": True}),
    ("sgd", ["optimizer.fused=true"], {"fused": True}),
    ("adamw", ["optimizer.foreach=true"], {"foreach": True}),
])
def test_fused_and_foreach_optimizers_take_the_same_steps(tmp_path, tiny, optimizer, flags, expected):
    """The fast kernels are selected by config and give the reference for-loop implementation's update."""
    params = []
    for i, extra in enumerate([["optimizer.foreach=false"], flags]):
        built = build(tiny + [f"optimizer={optimizer}", "optimizer.weight_decay=0.1", *extra], tmp_path / str(i))
        opt = built.module.configure_optimizers()["optimizer"]
        for key, value in expected.items():
            assert opt.defaults[key] is value if i else not opt.defaults.get(key)
        torch.manual_seed(0)
        for p in built.module.parameters():
            p.grad = torch.randn_like(p)
        for _ in range(3):
            opt.step()
        params.append([p.detach().clone() for p in built.module.parameters()])
    for plain, fast in zip(*params):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
