"""RETRO's leakage effect (§4.4) on the built-in corpus: one model, validated with and without the leakage rule.

    python tools/measure_retro_leakage.py [--steps 1000] [--encoder-steps 100] [--train-rule on|off] [--out DIR]

1. an MLM encoder trained by lmkit (bert_tiny, ``--encoder-steps``), the store's frozen retriever;
2. a store of the whole corpus (``split=all``: training and validation text), split into speeches, chunks of 16;
3. ``retro_tiny`` trained ``--steps`` steps on it with RETRO's rule (no neighbour from the chunk's own speech;
   ``--train-rule off``: without it, so that training neighbours hold the chunk's own continuation and the
   model learns to copy, the setting the rule exists to prevent);
4. its last checkpoint validated twice: with the rule (the validation chunk's own speech excluded, so the
   store's validation text helps only through other speeches) and without it (a chunk may retrieve itself and
   its continuation: the leak).
Needs plugins/lmkit-retrieval. Prints val bits/byte for both; record them with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

SPEECHES = 'data.doc_separator="\n\n"'


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--encoder-steps", type=int, default=100)
    ap.add_argument("--train-rule", choices=("on", "off"), default="on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lmkit.api import build, run
    from lmkit.cli import main as cli

    out = Path(args.out or tempfile.mkdtemp(prefix="retro-leak-"))
    quiet = ["logger=csv", "callbacks=[]", "trainer.progress_bar=false"]
    t0 = time.time()
    run(["+objective=mlm", "model=bert_tiny", f"trainer.max_steps={args.encoder_steps}", SPEECHES, *quiet],
        out / "encoder")
    assert cli(["retrieval", "build", str(out / "store"), f"encoder={out / 'encoder'}", "chunk_len=16", "split=all",
                SPEECHES, "force=true"]) == 0
    retro = ["model=retro_tiny", "+objective=retro_lm", f"objective.store={out / 'store'}", SPEECHES,
             "data.seq_len=64", "data.batch_size=16", f"trainer.max_steps={args.steps}",
             f"trainer.val_check_interval={args.steps}", "trainer.val_batches=50", "optimizer.lr=1e-3",
             "scheduler.warmup_steps=50", f"objective.exclude_same_document={args.train_rule == 'on'}",
             "objective.val_exclude_same_document=true", *quiet]
    trained = run(retro, out / "retro")
    ckpt = out / "retro" / "checkpoints" / "last.ckpt"
    leaky = build(retro + ["objective.val_exclude_same_document=false"], out / "leaky")
    leaky.trainer.validate(leaky.module, datamodule=leaky.datamodule, ckpt_path=str(ckpt), verbose=False)
    open_rule = leaky.module.history[-1]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} steps, training rule "
          f"{args.train_rule}, {time.time() - t0:.0f} s; {out}")
    print("| validation neighbours | val bits/byte | val loss |\n|---|---|---|")
    print(f"| own speech excluded (RETRO's rule) | {trained['end']['val/bpb']:.3f} | {trained['end']['val/loss']:.4f} |")
    print(f"| own speech allowed (leak) | {open_rule['val/bpb']:.3f} | {open_rule['val/loss']:.4f} |")


if __name__ == "__main__":
    main()
