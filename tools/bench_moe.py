"""Benchmark the lmkit-moe switch layer against a dense FFN and a per-expert loop.

One run times forward+backward (training mode) of, on the same tokens, round-robin
(median per implementation):

* ``switch (grouped_mm)`` / ``switch (bmm)``: ``lmkit_moe.MoELayer``, top-1, with its two
  dispatch paths (sort + grouped GEMM, or padded batched matmul);
* ``dense FFN``: ``lmkit.models.layers.MLP`` with the same d_ff as one expert, i.e. the
  same *active* parameters per token (the switch layer adds only the router);
* ``per-expert loop``: the structure of HF ``SwitchTransformersSparseMLP`` — one-hot
  router mask, capacity by cumulative sum, a Python loop over experts with boolean-mask
  gather/scatter — sharing the switch layer's weights (outputs are checked equal).

Prints a markdown table with tokens/s and ratios to the dense FFN.

    PYTHONPATH=. python tools/bench_moe.py                      # CPU defaults
    PYTHONPATH=. python tools/bench_moe.py --device cuda --dtype bfloat16 --tokens 32768 --d-model 1024
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "plugins", "lmkit-moe"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lmkit.models.layers import MLP  # noqa: E402
from lmkit_moe import MoELayer, grouped_mm_supported  # noqa: E402


class LoopSwitchMLP(nn.Module):
    """Per-expert loop (HF SwitchTransformersSparseMLP style) over an MoELayer's weights.

    Same semantics as MoELayer top-1: capacity ``ceil(T/E·cf)`` over the flattened batch
    in token order, dropped tokens output zero, output scaled by the router probability.
    """

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        moe = self.moe
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        logits = moe.router(xf)
        probs = logits.softmax(-1)
        top_p, top_e = probs.max(-1)
        mask = F.one_hot(top_e, moe.num_experts)                       # [T, E]
        priority = torch.cumsum(mask, dim=0)
        cap = moe.capacity(xf.shape[0])
        mask = (mask * (priority <= cap)).bool()
        ex = moe.experts
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = xf.new_zeros(xf.shape, dtype=dtype)
        for e in range(moe.num_experts):
            sel = mask[:, e]
            if not bool(sel.any()):
                continue
            h = F.linear(xf[sel], ex.fc_weight[e], None if ex.fc_bias is None else ex.fc_bias[e])
            y = F.linear(ex.act(h), ex.proj_weight[e], None if ex.proj_bias is None else ex.proj_bias[e])
            out[sel] = y.to(dtype)
        return (out * top_p[:, None].to(out.dtype)).view(shape)


def make_step(module, x, autocast):
    def step():
        xi = x.detach().requires_grad_()
        with autocast():
            y = module(xi)
        y.float().square().mean().backward()
    return step


def time_interleaved(steps: dict, iters: int, warmup: int, device) -> dict:
    """Median seconds per step of each entry, timed round-robin so that load from other
    processes on a shared machine hits every implementation alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16 = autocast (router stays float32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    torch.manual_seed(0)
    D, Fd, E, N = args.d_model, args.d_ff, args.experts, args.tokens
    kw = dict(capacity_factor=args.capacity_factor, jitter=0.0)
    switch_g = MoELayer(D, Fd, E, dispatch="grouped_mm", **kw).to(device)
    switch_b = MoELayer(D, Fd, E, dispatch="bmm", **kw).to(device)
    switch_b.load_state_dict(switch_g.state_dict())
    loop = LoopSwitchMLP(switch_g)
    dense = MLP(D, Fd).to(device)
    x = torch.randn(1, N, D, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    gmm_ok = grouped_mm_supported(device.type, device.index, amp_dtype or torch.float32)
    with torch.no_grad(), autocast():
        y_ref = loop(x)
        for layer in ([switch_g] if gmm_ok else []) + [switch_b]:
            y = layer(x)
            tol = 1e-4 if amp_dtype is None else 5e-2
            if not torch.allclose(y.float(), y_ref.float(), atol=tol, rtol=tol):
                raise SystemExit(f"{layer.experts.dispatch} output differs from the loop reference")
        dropped = switch_b.lmkit_metrics()["dropped_fraction"].item()

    cases = {"dense FFN (same active params)": dense}
    if gmm_ok:
        cases["switch, grouped_mm"] = switch_g
    cases["switch, padded bmm"] = switch_b
    cases["per-expert loop (HF-style)"] = loop
    medians = time_interleaved({n: make_step(m, x, autocast) for n, m in cases.items()},
                               args.iters, args.warmup, device)
    active = sum(p.numel() for p in dense.parameters())
    results = [{"impl": n, "ms": medians[n] * 1e3, "tokens_per_s": N / medians[n],
                "params": sum(p.numel() for p in m.parameters())} for n, m in cases.items()]
    dense_tps = results[0]["tokens_per_s"]
    cpu = platform.processor() or platform.machine()
    print(f"# bench_moe: fwd+bwd, {N} tokens, d_model={D}, d_ff={Fd}, experts={E}, top-1, "
          f"capacity_factor={args.capacity_factor} (dropped {dropped:.1%}), {args.dtype}")
    print(f"# device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu}), "
          f"threads={torch.get_num_threads()}, cpus={os.cpu_count()}, torch {torch.__version__}, "
          f"grouped_mm usable: {gmm_ok}; active params/token ≈ {active:,}")
    print()
    print("| implementation | params | median ms / step | tokens/s | vs dense |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        r["vs_dense"] = r["tokens_per_s"] / dense_tps
        print(f"| {r['impl']} | {r['params']:,} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['vs_dense']:.2f}x |")
    loop_tps = results[-1]["tokens_per_s"]
    for r in results[1:-1]:
        print(f"\n{r['impl']}: {r['tokens_per_s'] / loop_tps:.2f}x the per-expert loop")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "dropped_fraction": dropped, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
