"""Banded (``model.attention=alternating_local``) vs dense attention on CPU: step time and peak memory.

    python tools/bench_local_attention.py [--lengths 2048 4096 8192] [--window 256] [--repeats 3] [--out FILE]

Two workloads, forward + backward, batch 1:

* ``layer``: one attention layer's core, q/k/v [1, H=8, T, 64] -> output, three ways: ``dense`` (SDPA with
  ``is_causal``, what a dense layer runs), ``banded`` (:func:`lmkit.models.local_attention.banded_attention`,
  the blocked O(T·W) kernel) and ``band_mask`` (SDPA with the band as a dense [T, T] mask: the naive exact
  alternative the blocked kernel replaces).
* ``model``: a whole small GPT (4 layers, d_model 256, 4 heads, byte vocabulary), loss = sum of squares of
  the hidden states, ``attention=dense`` vs ``alternating_local`` (layers 1 and 3 banded).

Time: the median of ``--repeats`` steps after one warm-up step. Peak memory: each (workload, variant, T)
runs in a fresh process (``glibc`` told by ``MALLOC_MMAP_THRESHOLD_`` to map large blocks, so freed
tensors leave the resident set); the figure is the process's peak resident set (``ru_maxrss``) during
the first step minus its resident set just before it (inputs and weights already allocated): the extra
memory one step needs. (tracemalloc does not see torch's tensor allocations, and torch has no CPU
allocator statistics.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

LAYER = dict(H=8, d=64)
MODEL = dict(n_layer=4, d_model=256, n_head=4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _step_fn(workload: str, variant: str, T: int, window: int):
    import torch
    import torch.nn.functional as F

    from lmkit.models.local_attention import banded_attention, band_mask

    torch.manual_seed(0)
    if workload == "layer":
        q, k, v = (torch.randn(1, LAYER["H"], T, LAYER["d"], requires_grad=True) for _ in range(3))
        if variant == "dense":
            attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        elif variant == "banded":
            attend = lambda: banded_attention(q, k, v, window)  # noqa: E731
        else:
            pos = torch.arange(T)

            def attend():  # the [T, T] band mask is built in the step, as a model's forward would
                return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(pos, pos, window))

        def step():
            attend().sum().backward()
        return step
    from lmkit.models.gpt import GPT, GPTConfig

    attention = {"dense": ("dense", None), "banded": ("alternating_local", window)}[variant]
    model = GPT(GPTConfig(**MODEL, vocab_size=256, max_seq_len=T, attention=attention[0],
                          attention_window=attention[1]))
    ids = torch.randint(0, 256, (1, T))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids).pow(2).mean().backward()
    return step


def _measure_one(workload: str, variant: str, T: int, window: int, repeats: int) -> dict:
    """In this (fresh) process: the extra peak memory of the first step, then the median step time."""
    import torch

    step = _step_fn(workload, variant, T, window)
    before = _rss_bytes()
    step()
    peak = max(0, _maxrss_bytes() - before)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"workload": workload, "variant": variant, "T": T, "window": window,
            "step_ms": 1000 * statistics.median(times), "peak_extra_mib": peak / 2 ** 20,
            "threads": torch.get_num_threads()}


def _run_child(workload, variant, T, window, repeats) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--child", workload, variant, str(T), str(window), str(repeats)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        workload, variant, T, window, repeats = args.child
        print(json.dumps(_measure_one(workload, variant, int(T), int(window), int(repeats))))
        return 0
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
          f"window W={args.window}; layer: H={LAYER['H']} d={LAYER['d']}; model: {MODEL}")
    print(f"{'workload':8} {'variant':10} {'T':>6} {'step ms':>10} {'peak extra MiB':>15}")
    rows = []
    for workload, variants in (("layer", ("dense", "banded", "band_mask")), ("model", ("dense", "banded"))):
        for T in args.lengths:
            for variant in variants:
                row = _run_child(workload, variant, T, args.window, args.repeats)
                rows.append(row)
                print(f"{workload:8} {variant:10} {T:>6} {row['step_ms']:>10.1f} {row['peak_extra_mib']:>15.1f}",
                      flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
