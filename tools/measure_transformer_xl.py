"""Validation perplexity of Transformer-XL with and without its recurrence memory.

Trains ``transformer_xl_tiny`` with a memory (and, unless ``--no-baseline``, the same model with
``memory_len=0``) on the built-in corpus with the byte tokenizer, then scores the whole validation
split in stream order three ways with the same weights: with the memory of training length, with a
longer memory (the paper evaluates with longer memories), and stateless (no memory). Every way
scores the same blocks; only the context the memory adds differs. The validation stream is cut like the
training stream (windows of seq_len + 1 every seq_len tokens), so that each segment continues the last:
the data module's own validation windows do not overlap (stride seq_len + 1) and skip one token at every
segment boundary, which misplaces the memory by one position (``val_ppl_in_training_loop`` has that gap).
Besides perplexity it reports the
mean loss (nats) at the first ``--head`` positions of each segment and at the rest: the first
positions have almost no context of their own, so that is where a memory shows most.

    python tools/measure_transformer_xl.py --steps 1000 --seq-len 64 --memory 64 --out /tmp/xl_measure

``--runs memory`` / ``--runs no_memory`` trains one of the two (two processes can share a machine);
``--score-only`` rescores the runs already under ``--out``.
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
            f"optimizer.lr={args.lr}", f"scheduler.warmup_steps={args.warmup}", "logger=none",
            "callbacks=[]", "trainer.progress_bar=false", f"seed={args.seed}", *args.set]


@torch.no_grad()
def stream_scores(model, val_set, batch_size: int, memory: int | None, max_batches: int, head: int) -> dict:
    """Perplexity over the validation blocks in stream order (``memory`` None = stateless, else that length),
    and the mean loss at the first ``head`` positions of each segment and at the others."""
    from lmkit.data.sampler import StreamSequentialBatchSampler
    from lmkit.models.memory import StreamMemory

    model.eval()
    model.stream_memory = StreamMemory(memory or 0)
    model.memory_len = memory or 0
    model.stream_memory.mode = "val" if memory else None
    nll, rows = None, 0
    for batch in StreamSequentialBatchSampler(len(val_set), batch_size, max_batches or None):
        blocks = torch.stack([val_set[key][0] for key in batch])
        logits = model.logits(model(blocks[:, :-1]))
        per_token = F.cross_entropy(logits.transpose(1, 2).float(), blocks[:, 1:], reduction="none")  # [B, T]
        nll = per_token.sum(0) if nll is None else nll + per_token.sum(0)
        rows += blocks.shape[0]
    position = nll / rows  # mean loss at each position of the segment
    return {"ppl": round(math.exp(float(position.mean())), 3),
            f"loss_first_{head}": round(float(position[:head].mean()), 4),
            "loss_rest": round(float(position[head:].mean()), 4), "tokens": rows * len(position)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--memory", type=int, default=64)
    parser.add_argument("--eval-memory", type=int, default=192, help="the longer memory scored after training")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=0, help="batches scored per way (0 = the whole split)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="scheduler.warmup_steps")
    parser.add_argument("--head", type=int, default=8, help="first positions of a segment reported apart")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--runs", default="memory,no_memory", help="which of memory,no_memory to train")
    parser.add_argument("--no-baseline", action="store_true", help="skip the model trained with memory_len=0")
    parser.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. model.pre_lnorm=false")
    parser.add_argument("--score-only", action="store_true", help="score the runs already under --out")
    parser.add_argument("--out", default="/tmp/xl_measure")
    args = parser.parse_args()

    from lmkit.api import build, run
    from lmkit.data.datamodule import BlockDataset
    from lmkit.generation import load_for_generation

    runs = [r for r in args.runs.split(",") if not (args.no_baseline and r == "no_memory")]
    out, results = Path(args.out), {}
    for name in runs:
        memory = {"memory": args.memory, "no_memory": 0}[name]
        start = time.time()
        summary = None if args.score_only else run(overrides(args, memory), out / name)
        seconds = time.time() - start
        model, _, _ = load_for_generation(out / name)
        data = build(overrides(args, memory), out / f"{name}_build").datamodule
        data.setup("fit")
        val_set = BlockDataset(data.splits.val, data.block_len, data.stride)  # contiguous, as training
        scores = {"stateless": stream_scores(model, val_set, args.batch_size, None, args.val_batches, args.head)}
        for length in (args.memory, args.eval_memory):  # the memory_len=0 model too: memory it never trained with
            scores[f"memory_{length}"] = stream_scores(model, val_set, args.batch_size, length, args.val_batches,
                                                       args.head)
        results[name] = {"train_memory_len": memory, "scores": scores}
        if summary is not None:
            results[name].update(train_seconds=round(seconds, 1), params=summary["params"],
                                 val_ppl_in_training_loop=round(summary["end"]["val/ppl"], 3))
        print(name, json.dumps(results[name]), flush=True)
    (out / f"results_{'_'.join(runs)}{'_rescored' if args.score_only else ''}.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                                   indent=2))


if __name__ == "__main__":
    main()
