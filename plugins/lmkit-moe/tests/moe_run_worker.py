"""Training runs for the integration tests, through lmkit's own build path.

``python moe_run_worker.py OUT_JSON RUN_DIR [RESUME_RUN_DIR] -- OVERRIDES... [-- RESUME_OVERRIDES...]`` (under torchrun
for the expert-parallel runs) trains ``RUN_DIR`` with a callback recording, per optimizer step,
the training loss of the *global* batch (the mean over ranks of the rank losses: every rank
has the same number of targets here) and the validation losses, and writes them to OUT_JSON
(rank 0). With RESUME_RUN_DIR it then trains that directory with ``lmkit.api.run`` resuming
from ``RUN_DIR``'s step-2 checkpoint (the CLI's path: resolve_resume, tokenizer check, ...).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class LossRecorder(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics["train/loss"].detach().float().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.train.append(float(loss))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val/loss"]))  # global (SumMetric sync)


def train_recorded(overrides: list[str], run_dir: str) -> dict:
    import lmkit.api

    built = lmkit.api.build(overrides, run_dir)
    rec = LossRecorder()
    built.trainer.callbacks.append(rec)
    built.trainer.fit(built.module, datamodule=built.datamodule,
                      ckpt_path=str(built.ckpt_path) if built.ckpt_path else None)
    return {"train": rec.train, "val": rec.val, "world": built.trainer.world_size,
            "rank": built.trainer.global_rank}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    sep = argv.index("--")
    paths, overrides = argv[:sep], argv[sep + 1:]
    extra = []
    if "--" in overrides:  # overrides for the resumed run only
        sep = overrides.index("--")
        overrides, extra = overrides[:sep], overrides[sep + 1:]
    out, run_dir = paths[0], paths[1]
    result = train_recorded(overrides, run_dir)
    if len(paths) > 2:
        import lmkit.api

        ckpt = Path(run_dir) / "checkpoints" / "step000002.ckpt"
        summary = lmkit.api.run(overrides + extra + [f"resume={ckpt}"], paths[2])
        result["resumed_steps"] = summary["steps"]
    if result["rank"] == 0:
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    from lmkit.process_exit import exit_process

    main(sys.argv[1:])
    if dist.is_initialized():
        dist.barrier()
    exit_process(0)  # not a plain return: gloo threads alive at interpreter finalization can abort a rank
