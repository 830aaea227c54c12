"""Tokenization benchmark: lmkit's streaming token cache vs HF ``datasets`` text loading + ``.map``.

    python tools/bench_tokenize.py [--sizes-mb 100,1000] [--files 4] [--tokenizer bpe|byte] [--vocab 8000]
                                   [--workers 1,2] [--num-proc 2] [--skip-hf] [--dir /tmp/bench_tok]
                                   [--out bench_tokenize.json]

The corpus is synthetic: the lines of the built-in tinyshakespeare corpus, shuffled with a fixed
seed and repeated until ``--sizes-mb`` MB, spread over ``--files`` files. Each measurement runs in
a fresh subprocess on the same files with the same tokenizer (a BPE trained once on
tinyshakespeare, or bytes) and reports wall seconds, tokens/s and peak RSS (``ru_maxrss`` of the
process and, separately, the largest of its child processes: ``datasets`` ``num_proc`` workers).

* ``lmkit``: ``lmkit.data.tokenize_stream.build_token_cache`` of a ``TextSource`` over the files
  (each file one document, lmkit's default ``data.doc_separator: null``) with ``workers`` processes.
* ``hf``: ``datasets.load_dataset("text", data_files=...)`` (one row per line) then
  ``.map(batched=True, num_proc=N)`` calling the same HF tokenizer's ``encode_batch``
  (``keep_linebreaks=True``); its own Arrow cache in a fresh directory. The token streams differ
  only in where documents end (lines vs files); the text and the tokenizer are the same.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(directory: Path, size_mb: int, files: int) -> list[Path]:
    """``files`` files of about ``size_mb`` MB in all (reused when present)."""
    out = directory / f"corpus_{size_mb}mb_{files}f"
    paths = [out / f"part{i:02d}.txt" for i in range(files)]
    if all(p.exists() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "lmkit/data/corpora/tinyshakespeare.txt").read_text().splitlines(keepends=True)
    rng = random.Random(0)
    per_file = size_mb * 1_000_000 // files
    for p in paths:
        with open(p, "w") as f:
            written = 0
            while written < per_file:
                rng.shuffle(lines)
                chunk = "".join(lines)
                f.write(chunk)
                written += len(chunk)
    return paths


def make_tokenizer(kind: str, vocab: int, directory: Path) -> Path:
    path = directory / f"tok_{kind}_{vocab}.json"
    if not path.exists():
        from lmkit.tokenizers.byte import ByteTokenizer
        from lmkit.tokenizers.trained import TrainedTokenizer, train_hf_tokenizer

        if kind == "byte":
            ByteTokenizer().save(path)
        else:
            text = (ROOT / "lmkit/data/corpora/tinyshakespeare.txt").read_text()
            TrainedTokenizer(train_hf_tokenizer(kind, [text], vocab), kind).save(path)
    return path


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    impl, tok_path, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    workers, files = int(sys.argv[4]), sys.argv[5:]
    from lmkit.tokenizers.trained import load_tokenizer_file
    tok = load_tokenizer_file(tok_path)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if impl == "lmkit":
        from lmkit.data.sources import TextSource
        from lmkit.data.tokenize_stream import build_token_cache
        n = len(build_token_cache(TextSource(files), tok, workdir / "tokens" / "all.npy", workers=workers))
    else:
        import datasets
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=str(workdir / "hf"),
                                  keep_linebreaks=True)
        if hasattr(tok, "hf"):
            fn = lambda b: {"ids": [e.ids for e in tok.hf.encode_batch(b["text"], add_special_tokens=False)]}
        else:
            fn = lambda b: {"ids": [list(t.encode()) for t in b["text"]]}
        ds = ds.map(fn, batched=True, num_proc=workers if workers > 1 else None, remove_columns=["text"])
        n = sum(len(x) for batch in ds.iter(batch_size=10000) for x in batch["ids"])  # counting, not timed
        n_time = time.perf_counter()
    t1 = time.perf_counter() if impl == "lmkit" else n_time
    ru_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"tokens": n, "seconds": t1 - t0, "rss_after_imports_mb": rss0 / 1024,
                      "peak_rss_mb": ru_self / 1024, "peak_child_rss_mb": ru_kids / 1024}))
""")


def measure(impl: str, tok_path: Path, files: list[Path], workers: int, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", CHILD, impl, str(tok_path), str(workdir), str(workers), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="100,1000")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--tokenizer", default="bpe", choices=["bpe", "wordpiece", "byte"])
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workers", default="1,2", help="lmkit process counts to measure")
    ap.add_argument("--num-proc", type=int, default=2, help="datasets .map num_proc")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dir", default="/tmp/bench_tok")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    tok_path = make_tokenizer(args.tokenizer, args.vocab, base)
    rows = []
    for size in (int(s) for s in args.sizes_mb.split(",")):
        files = make_corpus(base, size, args.files)
        runs = [("lmkit", int(w)) for w in args.workers.split(",")]
        if not args.skip_hf:
            runs.append(("hf", args.num_proc))
        for impl, workers in runs:
            r = {"size_mb": size, "impl": impl, "workers": workers, "tokenizer": args.tokenizer,
                 **measure(impl, tok_path, files, workers, base / "work")}
            rows.append(r)
            print(f"{size:>6} MB  {impl:<6} workers={workers}  {r['tokens']:>12,} tokens  {r['seconds']:8.1f} s  "
                  f"{r['tokens_per_s'] / 1e6:7.2f} M tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(after imports {r['rss_after_imports_mb']:.0f} MB) "
                  f"(largest child {r['peak_child_rss_mb']:.0f} MB)", flush=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
