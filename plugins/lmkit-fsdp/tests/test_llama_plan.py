"""The llama family's tensor-parallel plan: chosen for llama blocks, refusing head counts that do not
split, and FSDP x TP (tp=2) on 2 CPU ranks training a grouped-query llama like one process does."""
from __future__ import annotations

import pytest
import torch

from lmkit.errors import ConfigError
from lmkit.models.llama import Llama, LlamaConfig

LLAMA = ["model=llama_tiny", "model.n_kv_head=2", "model.d_ff=64"]


def _llama(**kw):
    return Llama(LlamaConfig(**{**dict(n_layer=2, n_head=4, n_kv_head=2, d_model=16, d_ff=24, vocab_size=32,
                                      max_seq_len=8), **kw}))


def test_llama_blocks_get_the_llama_plan():
    from lmkit_fsdp.families import plan_for

    plan = plan_for(_llama(), 2, "llama")
    assert plan.name == "llama"
    with pytest.raises(ConfigError, match="n_kv_head=2 is not divisible by 4") as e:
        plan_for(_llama(), 4, "llama")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="the MLP width d_ff=25 is not divisible by 2"):
        plan_for(_llama(d_ff=25), 2, "llama")


def test_llama_plan_is_refused_before_processes(tmp_path):
    import lmkit.api

    with pytest.raises(ConfigError, match="n_kv_head=1 is not divisible by 2"):
        lmkit.api.build([*LLAMA, "model.n_kv_head=1", "strategy=fsdp_tp", "strategy.tensor_parallel_size=2",
                         "trainer.devices=2", "trainer.accelerator=cpu", "data.seq_len=32"], tmp_path)


@pytest.mark.slow
def test_tensor_parallel_llama_matches_single_process(launcher):
    steps = ["data.batch_size=8", "trainer.max_steps=3"]
    reference = launcher.run("llama_reference", [*LLAMA, *steps, "trainer.devices=1"])
    tp = launcher.run("llama_tp2", [*LLAMA, *steps, "strategy=fsdp_tp", "strategy.tensor_parallel_size=2",
                                    "trainer.devices=2"], nproc=2)
    assert tp["world"] == 2 and tp["steps"] == 3
    err = max(abs(a - b) for a, b in zip(tp["losses"], reference["losses"]))
    assert len(tp["losses"]) == len(reference["losses"]) == 3 and err < 1e-5, (tp["losses"], reference["losses"])
    a = {k: v.float() for k, v in tp["state"].items()}
    b = {k: v.float() for k, v in reference["state"].items()}
    assert set(a) == set(b) and "model.blocks.0.attn.k.weight" in a
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
