"""Token stores: ``python -m lmkit optimize`` time and the training loader's throughput, litdata vs the memmap path.

    python tools/bench_litdata.py [--copies 20] [--steps 200] [--workers 0 2]

Builds a corpus of ``--copies`` copies of the built-in corpus (1.1 MB each) in a temporary directory, tokenizes
it (byte tokenizer), writes a store, and times the causal-LM training loader (batch 32 × 129 tokens, collate
included) of ``data=text`` (memory-mapped cache, lmkit's step sampler) and ``data=litdata`` (litdata's
StreamingDataLoader) over ``--steps`` batches after a warm-up of 5. Prints one table; record it with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from lmkit.api import build
from lmkit.commands.optimize import optimize
from lmkit.data.sources import BUILTIN_CORPORA


def loader_rate(overrides: list[str], run_dir: Path, steps: int) -> float:
    built = build(overrides, run_dir)
    loader = built.datamodule.train_dataloader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        batch = next(it)
        tokens += sum(mb["input_ids"].numel() for mb in batch["micro_batches"])
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        text = BUILTIN_CORPORA["tinyshakespeare"].read_text()
        for i in range(args.copies):
            (corpus / f"part{i:03d}.txt").write_text(text)
        data = ["data=text", f"data.path={corpus}", f"data.cache_dir={tmp / 'cache'}"]
        start = time.perf_counter()
        meta = optimize(str(tmp / "store"), data, workers=os.cpu_count() or 1)
        optimize_s = time.perf_counter() - start
        mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; corpus {mb:.0f} MB, "
              f"{meta['tokens']['train']:,} training tokens")
        print(f"optimize (tokenize + write store, {os.cpu_count()} workers): {optimize_s:.1f} s, "
              f"{mb / optimize_s:.1f} MB/s")
        print("| loader | workers | tokens/s |\n|---|---|---|")
        common = ["data.seq_len=128", "data.batch_size=32", "logger=none", "callbacks=[]"]
        for workers in args.workers:
            for name, source in (("data=text (memmap)", data),
                                 ("data=litdata", ["data=litdata", f"data.path={tmp / 'store'}"])):
                rate = loader_rate(common + source + [f"data.num_workers={workers}"], tmp / f"run-{name[:4]}{workers}",
                                   args.steps)
                print(f"| {name} | {workers} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
