"""Retrieval index benchmark: faiss flat / ivfpq / hnsw vs brute-force torch matmul + topk.

    python tools/bench_retrieval.py [--sizes 10000,100000,1000000] [--d 128] [--k 10] [--queries 1000]
                                    [--threads 2] [--hnsw-max 1000000] [--data random|clustered]
                                    [--out bench_retrieval.json]

``--data random``: database and queries are independent random unit vectors: the hardest case
for the approximate indexes (no structure), so their recall there is a lower bound.
``--data clustered``: both drawn from a mixture of 1000 random unit centres plus Gaussian noise
of norm about 0.5, then normalised (closer to real embeddings, which cluster). Every index
uses lmkit-retrieval's settings (:class:`lmkit_retrieval.index.IndexSpec`: cosine = inner product
of L2-normalised vectors; ivfpq nlist = 4·√n, m = d/8 sub-quantizers of 8 bits, trained on 40·nlist
sampled vectors, nprobe 16; hnsw M 32, efConstruction 40, efSearch 64). Reported per size and
method: build time (training + adding), index bytes (faiss.serialize_index; the float32 matrix for
torch), queries/s (all queries in one call, torch in blocks of at most 2^27 scores) and recall@k
against the exact top-k of the flat index.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "lmkit-retrieval"))

from lmkit_retrieval.index import IndexSpec, build_index, faiss_module, search_params, set_threads  # noqa: E402


def unit_vectors(n: int, d: int, seed: int, data: str = "random") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    if data == "clustered":
        centres = np.random.default_rng(12345).standard_normal((1000, d), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x *= 0.5 / np.sqrt(d)
        x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def torch_topk(x: torch.Tensor, q: torch.Tensor, k: int) -> np.ndarray:
    block = max(1, (1 << 27) // x.shape[0])
    ids = [(qb @ x.T).topk(k, dim=1).indices for qb in q.split(block)]
    return torch.cat(ids).numpy()


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = (found[:, :, None] == truth[:, None, :]).any(-1).sum()
    return float(hits) / (len(truth) * k)


def bench_size(n: int, d: int, k: int, nq: int, hnsw_max: int, data: str) -> list[dict]:
    faiss = faiss_module()
    x, q = unit_vectors(n, d, 0, data), unit_vectors(nq, d, 1, data)
    rows = []
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    torch_topk(xt, qt[:8], k)  # warm-up
    ids, secs = timed(lambda: torch_topk(xt, qt, k))
    rows.append({"n": n, "method": "torch matmul+topk", "build_s": 0.0, "bytes": x.nbytes, "qps": nq / secs,
                 "recall": None})
    torch_ids = ids
    nlist = max(1, int(4 * np.sqrt(n)))
    specs = {"flat": IndexSpec("flat"),
             "ivfpq": IndexSpec("ivfpq", nlist=nlist, m=d // 8, nbits=8, nprobe=16, train_size=min(n, 40 * nlist)),
             "hnsw": IndexSpec("hnsw", M=32, ef_construction=40, ef_search=64)}
    truth = None
    for name, spec in specs.items():
        if name == "hnsw" and n > hnsw_max:
            continue
        index, build_s = timed(lambda: build_index(x, spec.check()))
        size = faiss.serialize_index(index).nbytes
        params = search_params(index, spec.resolved(n, d), k)
        index.search(q[:8], k, params=params) if params is not None else index.search(q[:8], k)
        (scores, ids), secs = timed(lambda: index.search(q, k, params=params) if params is not None
                                    else index.search(q, k))
        if name == "flat":
            truth = ids
            rows[0]["recall"] = recall(torch_ids, truth)
        rows.append({"n": n, "method": f"faiss {name}", "build_s": build_s, "bytes": size, "qps": nq / secs,
                     "recall": recall(ids, truth), "settings": {k2: v for k2, v in spec.resolved(n, d).as_dict().items()
                                                                if v is not None}})
        index = None  # free it before the next kind is built
        print(_row(rows[-1]), flush=True)
    print(_row(rows[0]), flush=True)
    return rows


def _row(r: dict) -> str:
    rec = "-" if r["recall"] is None else f"{r['recall']:.3f}"
    return (f"| {r['n']:>9,} | {r['method']:<18} | {r['build_s']:8.2f} | {r['bytes'] / 2**20:9.1f} | "
            f"{r['qps']:10,.0f} | {rec} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip hnsw above this many vectors")
    ap.add_argument("--data", choices=("random", "clustered"), default="random")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, faiss "
          f"{faiss_module().__version__}, threads {args.threads}, load {os.getloadavg()[0]:.2f}; {args.data} data, "
          f"d={args.d}, "
          f"k={args.k}, {args.queries} queries")
    print("| vectors | method | build s | MiB | queries/s | recall@k |\n|---|---|---|---|---|---|")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += bench_size(n, args.d, args.k, args.queries, args.hnsw_max, args.data)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
