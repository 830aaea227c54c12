"""Validation perplexity of Transformer-XL with and without its recurrence memory.

Trains ``transformer_xl_tiny`` with a memory (and, unless ``--no-baseline``, the same model with
``memory_len=0``) on the built-in corpus with the byte tokenizer, then scores the whole validation
split in stream order three ways with the same weights: with the memory of training length, with a
longer memory (the paper evaluates with longer memories), and stateless (no memory). Every way
scores the same blocks; only the context the memory adds differs.

    python tools/measure_transformer_xl.py --steps 300 --seq-len 64 --memory 64 --out /tmp/xl_measure
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def overrides(args, memory: int) -> list[str]:
    return ["model=transformer_xl_tiny", "+objective=causal_lm", f"data.seq_len={args.seq_len}",
            f"model.memory_len={memory}", f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
            f"trainer.val_check_interval={args.steps}", f"trainer.val_batches={args.val_batches}",
            "trainer.validate_at_start=false",
            f"optimizer.lr={args.lr}", f"scheduler.warmup_steps={max(1, args.steps // 20)}", "logger=none",
            "callbacks=[]", "trainer.progress_bar=false", f"seed={args.seed}"]


@torch.no_grad()
def stream_ppl(model, val_set, batch_size: int, memory: int | None, max_batches: int) -> float:
    """Perplexity over the validation blocks in stream order; ``memory`` None = stateless, else that length."""
    from lmkit.data.sampler import StreamSequentialBatchSampler
    from lmkit.models.memory import StreamMemory

    model.eval()
    model.stream_memory = StreamMemory(memory or 0)
    model.memory_len = memory or 0
    model.stream_memory.mode = "val" if memory else None
    nll, n = 0.0, 0
    for batch in StreamSequentialBatchSampler(len(val_set), batch_size, max_batches or None):
        blocks = torch.stack([val_set[key][0] for key in batch])
        logits = model.logits(model(blocks[:, :-1]))
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), blocks[:, 1:].flatten(), reduction="sum"))
        n += blocks[:, 1:].numel()
    return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--memory", type=int, default=64)
    parser.add_argument("--eval-memory", type=int, default=192, help="the longer memory scored after training")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=20, help="batches scored per way (0 = the whole split)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--no-baseline", action="store_true", help="skip the model trained with memory_len=0")
    parser.add_argument("--out", default="/tmp/xl_measure")
    args = parser.parse_args()

    from lmkit.api import build, run
    from lmkit.generation import load_for_generation

    out, results = Path(args.out), {}
    for name, memory in [("memory", args.memory)] + ([] if args.no_baseline else [("no_memory", 0)]):
        start = time.time()
        summary = run(overrides(args, memory), out / name)
        seconds = time.time() - start
        model, _, _ = load_for_generation(out / name)
        val_set = build(overrides(args, memory), out / f"{name}_build").datamodule.val_set
        scores = {"stateless": stream_ppl(model, val_set, args.batch_size, None, args.val_batches)}
        if memory:
            for length in (args.memory, args.eval_memory):
                scores[f"memory_{length}"] = stream_ppl(model, val_set, args.batch_size, length, args.val_batches)
        results[name] = {"train_memory_len": memory, "train_seconds": round(seconds, 1),
                         "val_ppl_in_training_loop": summary["end"]["val/ppl"], "params": summary["params"],
                         "val_ppl": {k: round(v, 3) for k, v in scores.items()}}
        print(name, json.dumps(results[name]), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
