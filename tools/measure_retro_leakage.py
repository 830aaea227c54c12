"""RETRO on the built-in corpus: validation bits/byte without retrieval, with a store of the training split, and
with a store of the whole corpus validated with and without the leakage rule (RETRO §4.4).

    python tools/measure_retro_leakage.py [--steps 2000] [--encoder-steps 1000 | --encoder RUN_DIR]
                                          [--train-rule on|off] [--keys center|whiten|raw] [--out DIR]
                                          [--runs none train all] [--seed N]

1. the stores' frozen retriever: ``gpt_tiny`` trained ``--encoder-steps`` steps of causal LM by lmkit (its
   mean-pooled last states), or ``--encoder``: an existing run. RETRO's retriever is a BERT, but lmkit's
   ``bert_tiny`` MLM runs stay near the unigram loss for their first 1000+ steps on this corpus (3.34 nats
   after 300 steps post-LN, 3.02 after 1000 pre-LN, vs the corpus's unigram 3.31), so their states carry
   little context; a causal LM is at 1.94 nats after 500 steps;
2. two stores, chunks of 16, the corpus split into speeches: the training split, and the whole corpus
   (``split=all``: training and validation text); for each, the fraction of its chunks whose top-1 neighbour is
   the chunk itself (or a chunk with the same tokens): near 1 when the keys separate chunks, near 0 when
   the embeddings have collapsed (see lmkit_retrieval/keys.py);
3. ``retro_tiny`` trained ``--steps`` steps three times, same seed and data: without neighbours (causal LM;
   the CCA layers are skipped, so this is the plain decoder), with the training store, with the whole-corpus
   store under RETRO's rule (no neighbour from the chunk's own speech; ``--train-rule off``: without it, so
   that training neighbours hold the chunk's own continuation and the model learns to copy);
4. the whole-corpus run's last checkpoint validated again without the rule for validation (a chunk may
   retrieve itself and its continuation: the leak).
``--runs`` picks which of the three trainings to make (all by default; the leak row comes with ``all``).
Needs plugins/lmkit-retrieval. Prints a markdown table; record it with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

SPEECHES = 'data.doc_separator="\n\n"'


def self_retrieval(store_dir: Path, sample: int = 2000) -> float:
    """Fraction of ``sample`` chunks (seeded) whose top-1 neighbour has the chunk's own tokens."""
    import numpy as np

    from lmkit_retrieval import Datastore

    store = Datastore.open(store_dir)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(store.n_chunks, size=min(sample, store.n_chunks), replace=False))
    ids, _ = store.search(np.asarray(store.embeddings[idx]), 1)
    return float((np.asarray(store.chunks[ids[:, 0]]) == np.asarray(store.chunks[idx])).all(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--encoder-steps", type=int, default=1000)
    ap.add_argument("--encoder", default=None, help="an existing encoder run directory (no encoder training)")
    ap.add_argument("--train-rule", choices=("on", "off"), default="on")
    ap.add_argument("--keys", choices=("center", "whiten", "raw"), default="center")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=None, help="the retro_tiny runs' seed (default: lmkit's)")
    ap.add_argument("--runs", nargs="+", choices=("none", "train", "all"), default=["none", "train", "all"])
    args = ap.parse_args()
    from lmkit.api import build, run
    from lmkit.cli import main as cli

    out = Path(args.out or tempfile.mkdtemp(prefix="retro-leak-"))
    quiet = ["logger=csv", "callbacks=[]", "trainer.progress_bar=false"]
    t0 = time.time()
    encoder = Path(args.encoder) if args.encoder else out / "encoder"
    if not args.encoder:
        trained = run(["model=gpt_tiny", f"trainer.max_steps={args.encoder_steps}", SPEECHES, *quiet], encoder)
        print(f"encoder: val loss {trained['end']['val/loss']:.4f} after {args.encoder_steps} steps")
    found = {}
    for split in ("train", "all"):
        assert cli(["retrieval", "build", str(out / f"store_{split}"), f"encoder={encoder}", "chunk_len=16",
                    f"split={split}", f"keys={args.keys}", "batch_size=256", SPEECHES, "force=true"]) == 0
        found[split] = self_retrieval(out / f"store_{split}")
    common = ["model=retro_tiny", SPEECHES, "data.seq_len=64", "data.batch_size=16", f"trainer.max_steps={args.steps}",
              f"trainer.val_check_interval={args.steps}", "trainer.val_batches=50", "optimizer.lr=1e-3",
              "scheduler.warmup_steps=50", *quiet] + ([f"seed={args.seed}"] if args.seed is not None else [])
    rows = []
    if "none" in args.runs:
        plain = run(common, out / "plain")["end"]
        rows.append(("none (retro_tiny as its plain decoder)", plain))

    def retro(split: str) -> list[str]:
        return common + ["+objective=retro_lm", f"objective.store={out / f'store_{split}'}",
                         f"objective.exclude_same_document={args.train_rule == 'on'}",
                         "objective.val_exclude_same_document=true"]

    if "train" in args.runs:
        rows.append(("store of the training split", run(retro("train"), out / "retro_train")["end"]))
    if "all" in args.runs:
        rows.append(("store of the whole corpus, own speech excluded (RETRO's rule)",
                     run(retro("all"), out / "retro_all")["end"]))
        leaky = build(retro("all") + ["objective.val_exclude_same_document=false"], out / "leaky")
        ckpt = out / "retro_all" / "checkpoints" / "last.ckpt"
        leaky.trainer.validate(leaky.module, datamodule=leaky.datamodule, ckpt_path=str(ckpt), verbose=False)
        rows.append(("same checkpoint, own speech allowed (the leak)", leaky.module.history[-1]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} steps, encoder "
          f"{encoder}, keys {args.keys}, training rule {args.train_rule}, "
          f"{time.time() - t0:.0f} s; {out}")
    print(f"self-retrieval (top-1 has the chunk's tokens, 2000 chunks): training store {found['train']:.3f}, "
          f"whole-corpus store {found['all']:.3f}")
    print("| retrieval | val bits/byte | val loss |\n|---|---|---|")
    for label, metrics in rows:
        print(f"| {label} | {metrics['val/bpb']:.3f} | {metrics['val/loss']:.4f} |")


if __name__ == "__main__":
    main()
