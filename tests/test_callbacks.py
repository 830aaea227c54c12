"""Built-in callbacks: train/tokens_per_s counts each data-parallel replica once."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmkit.callbacks import TokenThroughput
from lmkit.strategies import data_parallel_world


class _Module:
    def __init__(self, tokens):
        self.last_step_tokens = tokens  # the public count of LMModule
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def _trainer(world_size, sampler_kwargs=None):
    strategy = SimpleNamespace(distributed_sampler_kwargs=sampler_kwargs) if sampler_kwargs is not None else object()
    return SimpleNamespace(strategy=strategy, world_size=world_size, global_rank=1)


@pytest.mark.parametrize("trainer, replicas", [
    (_trainer(4), 4),  # DDP / FSDP: every rank is a replica
    (_trainer(4, {"num_replicas": 2, "rank": 1}), 2),  # 2 pipeline stages (or tensor-parallel peers) × 2 replicas
    (_trainer(4, {"num_replicas": 1, "rank": 0}), 1),  # one pipeline over 4 ranks
])
def test_tokens_per_s_counts_data_parallel_replicas(monkeypatch, trainer, replicas):
    clock = iter([10.0, 10.5])
    monkeypatch.setattr("lmkit.callbacks.time.perf_counter", lambda: next(clock))
    module, callback = _Module(tokens=1000), TokenThroughput()
    callback.on_train_batch_start(trainer, module, None, 0)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged["train/tokens_per_s"] == pytest.approx(1000 * replicas / 0.5)


def test_tokens_per_s_averages_over_the_window(monkeypatch):
    from lmkit.callbacks import TokenThroughputConfig

    clock = iter([0.0, 1.0, 1.0, 4.0])  # step 1: 1000 tokens in 1 s; step 2: 2000 tokens in 3 s
    monkeypatch.setattr("lmkit.callbacks.time.perf_counter", lambda: next(clock))
    callback, trainer = TokenThroughput(TokenThroughputConfig(window=2)), _trainer(1)
    for tokens in (1000, 2000):
        module = _Module(tokens)
        callback.on_train_batch_start(trainer, module, None, 0)
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged["train/tokens_per_s"] == pytest.approx(3000 / 4)


def test_lm_module_exposes_the_step_token_count_publicly():
    from lmkit.module import LMModule

    module = LMModule(torch.nn.Linear(2, 2), torch.nn.Identity(), None, None, weight_decay=0.0)
    assert module.last_step_tokens == 0
    module.last_step_tokens = 96
    assert module._last_step_tokens == 96  # the old private name still reads it


def test_data_parallel_world():
    assert data_parallel_world(None) == (0, 1)
    assert data_parallel_world(_trainer(4)) == (1, 4)
    assert data_parallel_world(_trainer(6, {"num_replicas": 3, "rank": 2})) == (2, 3)
