"""Framework overhead: lmkit's full training loop vs a plain PyTorch loop, same model/data/optimizer.

    python tools/bench_overhead.py [--steps 60] [--out bench_overhead.json] [overrides ...]

Both loops train the same architecture (same init seed) on the same batches with the same
optimizer, schedule, clipping and precision; lmkit's includes Lightning, logging, metrics,
checkpoint callbacks and the progress bar off. Each loop's rate comes from its median step
interval (end of step to end of step, so nothing per step is left out) after ``--warmup`` steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lmkit.api import build


class StepTimer(L.Callback):
    """Timestamps at the end of every training step (so intervals include all per-step work)."""

    def __init__(self):
        self.stamps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def median_rate(stamps, warmup, tokens_per_step):
    """Tokens/s from the median step interval after ``warmup`` steps (robust to bursts of a shared machine)."""
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    return tokens_per_step / statistics.median(intervals)


def lmkit_loop(overrides, steps, warmup):
    with tempfile.TemporaryDirectory() as d:
        built = build(overrides + [f"trainer.max_steps={steps}", "trainer.validate_at_start=false",
                                   f"trainer.val_check_interval={steps}", "trainer.val_batches=1",
                                   "trainer.progress_bar=false", "logger=csv", f"trainer.checkpoint_every_n_steps={steps}"], d)
        timer = StepTimer()
        built.trainer.callbacks.append(timer)
        built.trainer.fit(built.module, datamodule=built.datamodule)
        tokens = built.datamodule.cfg.batch_size * built.datamodule.cfg.grad_accum * built.datamodule.seq_len
        return median_rate(timer.stamps, warmup, tokens)


def plain_loop(overrides, steps, warmup):
    """The loop a user would write by hand around the same model and data."""
    with tempfile.TemporaryDirectory() as d:
        built = build(overrides, d)
        module, dm = built.module, built.datamodule
        model = module.model
        opt = module.configure_optimizers()
        optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
        loader = dm.train_dataloader()
        model.train()
        stamps = []
        for step, batch in enumerate(loader):
            if step == steps:
                break
            micro = batch["micro_batches"]
            total = sum(int((mb["labels"] != -100).sum()) for mb in micro)
            for mb in micro:
                hidden = model(mb["input_ids"])
                logits = model.logits(hidden)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="sum") / total
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            stamps.append(time.perf_counter())
        tokens = dm.cfg.batch_size * dm.cfg.grad_accum * dm.seq_len
        return median_rate(stamps, warmup, tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench_overhead.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    plain, fw = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        plain.append(plain_loop(args.overrides, args.steps, args.warmup))
        fw.append(lmkit_loop(args.overrides, args.steps, args.warmup))
    best_plain, best_fw = max(plain), max(fw)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "overrides": args.overrides, "steps": args.steps,
        "plain_tokens_per_s": best_plain, "lmkit_tokens_per_s": best_fw,
        "lmkit_over_plain": best_fw / best_plain, "overhead_pct": 100 * (1 - best_fw / best_plain),
        "runs": {"plain": plain, "lmkit": fw},
    }
    print(f"{'loop':<10} {'tokens/s':>12}")
    print(f"{'plain':<10} {best_plain:>12,.0f}")
    print(f"{'lmkit':<10} {best_fw:>12,.0f}")
    print(f"lmkit / plain = {result['lmkit_over_plain']:.3f}  (overhead {result['overhead_pct']:.1f}%)")
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
