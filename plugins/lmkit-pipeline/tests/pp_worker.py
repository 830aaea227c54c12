"""Worker processes of the pipeline tests, launched with torchrun (one process per rank).

``python -m torch.distributed.run --nproc-per-node N pp_worker.py MODE OUT [ARGS...]``

* ``grads OUT`` — for every schedule variant: one pipelined forward/backward of a step
  against the single-process full-batch step (loss, every gradient, the clipped norm,
  a validation batch); rank 0 writes the differences as JSON to OUT.
* ``train OUT RUN_DIR OVERRIDES...`` — ``lmkit.api.run`` (one run); rank 0 writes the summary.
* ``resume OUT RUN_DIR RESUME_DIR CKPT CKPT_DIR OVERRIDES...`` — a run of 2·k steps saving at
  k, a second run resuming from its step-k checkpoint into RESUME_DIR, and (unless CKPT is
  ``-``) a third resuming from the checkpoint file CKPT (e.g. a single-process run's) into CKPT_DIR.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402

from pp_common import TINY, add_aux_losses, reference_step  # noqa: E402

VARIANTS = [
    # (schedule, stages_per_rank, with auxiliary losses)
    ("gpipe", 1, False),
    ("1f1b", 1, False),
    ("interleaved_1f1b", 1, False),
    ("interleaved_1f1b", 2, False),
    ("looped_bfs", 2, False),
    ("interleaved_zero_bubble", 2, False),
    ("zbv_zero_bubble", 2, False),
    ("dualpipev", 2, False),
    ("1f1b", 1, True),
    ("zbv_zero_bubble", 2, True),
]


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def grads(out: str) -> None:
    from lmkit.api import build, load_run_config
    from lmkit_pipeline.config import PipelineConfig
    from lmkit_pipeline.runtime import PipelineRuntime

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = {}
    cache = {}
    for schedule, spr, aux in VARIANTS:
        name = f"{schedule}/spr{spr}" + ("/aux" if aux else "")
        if aux not in cache:
            # with aux losses the pipeline micro-batches must be the data micro-batches (the terms are per forward)
            data = ["data.batch_size=2", "data.grad_accum=4"] if aux else ["data.batch_size=8", "data.grad_accum=1"]
            overrides = TINY + data + ["trainer.devices=1"]
            built = build(overrides, "/tmp/lmkit-pp-unused")
            if aux:
                add_aux_losses(built.module.model)
            micro_batches = next(iter(built.datamodule.train_dataloader()))["micro_batches"]
            val_batch = next(iter(built.datamodule.val_dataloader()))["micro_batches"][0]
            pristine = copy.deepcopy(built.module)
            ref = reference_step(built.module, micro_batches, val_batch)
            cache[aux] = (pristine, load_run_config(overrides), micro_batches, val_batch, ref)
        pristine, run, micro_batches, val_batch, ref = cache[aux]
        lm = copy.deepcopy(pristine)
        cfg = PipelineConfig(pp_size=dist.get_world_size(), stages_per_rank=spr, schedule=schedule, n_microbatches=4)
        runtime = PipelineRuntime(cfg)
        runtime.setup(lm, run)
        lm._aux_logs = {}
        loss_sum, n_targets = runtime.forward_backward(lm, micro_batches)
        mine = {n: p.grad.detach().clone() for n, p in lm.named_parameters()
                if p.grad is not None and min(runtime.owners[id(p)]) == runtime.pp_rank}
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        norm = float(runtime.clip_grad_norm_(1e9))
        val = runtime.evaluate(lm, val_batch)
        if _rank() == 0:
            got = {}
            for part in parts:
                got.update(part)
            missing = sorted(set(ref["grads"]) - set(got))
            diffs = {n: float((got[n] - g).abs().max()) for n, g in ref["grads"].items() if n in got}
            results[name] = {
                "loss": float(loss_sum / n_targets), "ref_loss": ref["loss"],
                "max_grad_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get), "missing": missing,
                "n_grads": len(got), "n_ref_grads": len(ref["grads"]),
                "norm": norm, "ref_norm": ref["norm"], "sizes": runtime.sizes,
                "val_loss": float(val.loss_sum / val.n_targets), "ref_val_loss": ref["val_loss"],
                "val_nll": float(val.nll_sum), "ref_val_nll": ref["val_nll"],
                "aux_logs": {k: float(v) for k, v in lm._aux_logs.items()}, "ref_aux_logs": ref["aux_logs"],
            }
        dist.barrier()
    if _rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def train(out: str, run_dir: str, overrides: list[str]) -> None:
    from lmkit.api import run

    summary = run(overrides, run_dir)
    Path(f"{out}.rank{_rank()}").write_text(json.dumps(summary, default=str))  # metrics as every rank saw them
    if _rank() == 0:
        Path(out).write_text(json.dumps(summary, default=str))


def resume(out: str, run_dir: str, resume_dir: str, external: str, external_dir: str, overrides: list[str]) -> None:
    from lmkit.api import run

    first = run(overrides, run_dir)
    steps = int(next(o.split("=")[1] for o in overrides if o.startswith("trainer.checkpoint_every_n_steps=")))
    ckpt = Path(run_dir) / "checkpoints" / f"step{steps:06d}.ckpt"
    second = run(overrides + [f"resume={ckpt}"], resume_dir)
    third = run(overrides + [f"resume={external}"], external_dir) if external != "-" else None
    if _rank() == 0:
        Path(out).write_text(json.dumps({"first": first, "second": second, "third": third}, default=str))


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    if mode == "grads":
        grads(out)
    elif mode == "train":
        train(out, rest[0], rest[1:])
    elif mode == "resume":
        resume(out, rest[0], rest[1], rest[2], rest[3], rest[4:])
    else:
        raise SystemExit(f"unknown mode {mode}")
    from lmkit.process_exit import exit_process

    if dist.is_initialized():
        dist.barrier()
    exit_process(0)  # not a plain return: gloo threads alive at interpreter finalization can abort a rank
