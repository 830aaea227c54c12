"""One training run for the multi-process tests, launched by torchrun (or plain python for 1 rank).

    python fsdp_worker.py SPEC.json

SPEC: {"overrides": [...], "run_dir": ..., "out": ...}. Trains with lmkit.api.build (the
same path as the CLI), records the step losses averaged over ranks (each rank's loss is the
mean over its equal share of tokens), each rank's share of parameter elements, the full
final parameters in the checkpoint layout, and writes them (rank 0) to ``out`` (a .pt file).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    import lightning as L
    import torch.distributed as dist

    from lmkit.api import build, load_run_config
    from lmkit.train import save_run_files

    spec = json.loads(open(spec_path).read())
    run = load_run_config(spec["overrides"])
    built = build(spec["overrides"], spec["run_dir"])
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = trainer.callback_metrics["train/loss"].detach().float().reshape(1).clone()
            if dist.is_initialized():
                dist.all_reduce(loss)
                loss /= dist.get_world_size()
            losses.append(float(loss))

    built.trainer.callbacks.append(Record())
    from pathlib import Path

    save_run_files(run, built, Path(spec["run_dir"]))
    ckpt = str(built.ckpt_path) if built.ckpt_path else None
    built.trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=ckpt)

    module = built.module
    local = sum(_local_numel(p) for p in module.model.parameters())
    total = sum(_global_numel(p) for p in module.model.parameters())
    fractions = [local / total]
    frozen = [p for m in getattr(module.objective, "frozen_models", lambda: [])() for p in m.parameters()]
    frozen_fraction = sum(_local_numel(p) for p in frozen) / max(1, sum(_global_numel(p) for p in frozen))
    state = _full_state(built)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local / total)
        fractions = gathered
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, frozen_fraction)
        frozen_fraction = gathered
    if built.trainer.global_rank == 0:
        torch.save({"losses": losses, "fractions": fractions, "state": state, "frozen_fractions": frozen_fraction,
                    "steps": built.trainer.global_step,
                    "world": built.trainer.world_size}, spec["out"])


def _local_numel(p) -> int:
    from torch.distributed.tensor import DTensor

    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def _global_numel(p) -> int:
    return p.numel()


def _full_state(built) -> dict:
    """The model's full parameters in the checkpoint layout (all ranks take part; rank 0 gets them)."""
    strategy = built.trainer.strategy
    if hasattr(strategy, "layout"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(built.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = strategy.layout.fuse_state(sd)
    else:
        sd = built.module.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items() if k.startswith("model.")}


if __name__ == "__main__":
    from lmkit.process_exit import exit_process

    main(sys.argv[1])
    if dist.is_initialized():
        dist.barrier()
    exit_process(0)  # not a plain return: gloo threads alive at interpreter finalization can abort a rank
