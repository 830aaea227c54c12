"""llama cut into pipeline stages through the architecture contract (single process, no process group):
the rotary cos/sin and the mask reach every stage's blocks; loss, gradients and validation equal the
unsplit model's, untied head (last stage) and tied embedding (first and last stage) alike."""
from __future__ import annotations

import copy

import pytest
import torch

from pp_common import TINY, reference_step

LLAMA = ["model=llama_tiny", "model.n_kv_head=2", "model.d_ff=64"]


@pytest.mark.parametrize("tied, split", [(False, None), (True, [1, 3])])
def test_llama_stages_in_one_process_match_the_model(tmp_path, tied, split):
    from lmkit.api import build, load_run_config
    from lmkit_pipeline.config import PipelineConfig
    from lmkit_pipeline.runtime import PipelineRuntime

    overrides = TINY + LLAMA + ["data.batch_size=2", "data.grad_accum=4", "trainer.devices=1",
                                f"model.tie_embeddings={str(tied).lower()}"]
    built = build(overrides, tmp_path)
    lm, run = built.module, load_run_config(overrides)
    mbs = next(iter(built.datamodule.train_dataloader()))["micro_batches"]
    val_batch = next(iter(built.datamodule.val_dataloader()))["micro_batches"][0]
    ref = reference_step(copy.deepcopy(lm), mbs, val_batch)
    runtime = PipelineRuntime(PipelineConfig(pp_size=1, stages_per_rank=2, schedule="interleaved_1f1b",
                                             n_microbatches=4, split=split))
    runtime.setup(lm, run)
    lm._aux_logs = {}
    loss_sum, n = runtime.forward_backward(lm, mbs)
    grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    val = runtime.evaluate(lm, val_batch)
    assert runtime.sizes == (split or [2, 2])
    assert float(loss_sum / n) == pytest.approx(ref["loss"], abs=1e-5)
    assert set(grads) == set(ref["grads"]) and "model.blocks.0.attn.k.weight" in grads
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert float(val.loss_sum / val.n_targets) == pytest.approx(ref["val_loss"], abs=1e-5)
    first, last = (set(map(id, ps)) for ps in (runtime.stage_params[0], runtime.stage_params[-1]))
    m = lm.model
    assert id(m.ln_f.weight) in last - first
    if tied:
        assert id(m.wte.weight) in first & last
    else:
        assert id(m.wte.weight) in first - last and id(m.lm_head.weight) in last - first
