"""LoRA and prompt tuning vs full fine-tuning: trainable parameters, optimizer state, memory, step time.

    python tools/bench_lora.py                                   # gpt_small, batch 8 x 256 tokens, CPU
    python tools/bench_lora.py --model llama_small --steps 10 --threads 2
    python tools/bench_lora.py --device cuda                     # peak = torch.cuda.max_memory_allocated

Every variant is built through lmkit (``lmkit.api.build``: the preset, the byte tokenizer, the
built-in corpus, the ``lora`` / ``prompt_tuning`` model extension, LMModule's parameter groups and
AdamW) and trained on real batches (forward, backward, optimizer step). Reported per variant:

* trainable / total parameters (``requires_grad``);
* exact tensor bytes, independent of the allocator: the optimizer state (every tensor in
  ``optimizer.state``: Adam's two moments and step), the gradients, and the activations saved for
  backward in one step (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded);
  ``train state`` = weights + gradients + optimizer state + saved activations;
* peak memory, measured in a process of its own per variant: on CUDA the allocator's peak; on
  CPU the growth of the process's peak RSS over the training steps (the weights are resident
  before; the allocator's reuse of freed memory makes this a lower, noisier figure);
* step time: all variants built in one process and stepped in turn (full, lora, ..., full, lora,
  ...), the median per variant, so that a shared machine's slow moments hit them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": [],
    "lora_attention_r8": ["model.lora.r=8", "model.lora.alpha=16", "model.lora.targets=[attention]"],
    "lora_all_linear_r8": ["model.lora.r=8", "model.lora.alpha=16", "model.lora.targets=[all-linear]"],
    "prompt_tuning_20": ["model.prompt_tuning.length=20"],
}


def _rss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def _build(variant: str, args):
    import tempfile

    from lmkit.api import build

    seq = _seq(variant, args)
    overrides = [f"model={args.model}", f"data.seq_len={seq}", f"data.batch_size={args.batch}", "logger=none",
                 "callbacks=[]", "trainer.progress_bar=false", f"trainer.accelerator={args.device}",
                 "model.dropout=0.0", *VARIANTS[variant]]
    with tempfile.TemporaryDirectory() as tmp:
        built = build(overrides, tmp)
    module = built.module.to(args.device)
    optimizer = module.configure_optimizers()["optimizer"]
    loader = iter(built.datamodule.train_dataloader())
    batches = [{k: v.to(args.device) if hasattr(v, "to") else v for k, v in next(loader)["micro_batches"][0].items()}
               for _ in range(2)]
    return module, optimizer, batches


def _seq(variant: str, args) -> int:
    return args.seq - (20 if variant.startswith("prompt") else 0)  # the soft prompt takes positions too


def _stepper(module, optimizer, batches, device):
    import torch

    state = {"i": 0}

    def step():
        out = module.objective.loss(module.model, batches[state["i"] % 2])
        (out.loss_sum / out.n_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: their memory counts
        if device == "cuda":
            torch.cuda.synchronize()
        state["i"] += 1

    return step


def _saved_activation_bytes(module, batch) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (distinct storages, parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module.objective.loss(module.model, batch)
    (out.loss_sum / out.n_targets).backward()
    module.zero_grad(set_to_none=False)
    return sum(seen.values())


def worker(args) -> dict:
    """Sizes and peak memory of one variant (a process of its own)."""
    import torch

    torch.set_num_threads(args.threads)
    module, optimizer, batches = _build(args.variant, args)
    step = _stepper(module, optimizer, batches, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    for _ in range(3):
        step()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _rss_bytes() - rss0
    params = list(module.parameters())
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    opt_bytes = sum(nbytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    grad_bytes = sum(nbytes(p.grad) for p in params if p.grad is not None)
    weight_bytes = sum(nbytes(p) for p in params)
    act_bytes = _saved_activation_bytes(module, batches[0])
    return {"variant": args.variant, "trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params), "weight_bytes": weight_bytes, "optimizer_state_bytes": opt_bytes,
            "grad_bytes": grad_bytes, "saved_activation_bytes": act_bytes,
            "train_state_bytes": weight_bytes + grad_bytes + opt_bytes + act_bytes, "peak_bytes": peak,
            "peak_kind": "CUDA allocator peak" if args.device == "cuda" else "CPU peak-RSS growth over 3 steps"}


def timing(args, names) -> dict:
    """Median step seconds of each variant, stepped in turn in one process."""
    import torch

    torch.set_num_threads(args.threads)
    steppers = {n: _stepper(*_build(n, args), args.device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(2):  # warm-up
        for step in steppers.values():
            step()
    for _ in range(args.steps):
        for n, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt_small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.variant == "timing":
        print(json.dumps(timing(args, args.variants.split(","))))
        return
    if args.variant:
        print(json.dumps(worker(args)))
        return
    results = []
    names = args.variants.split(",")
    for name in [*names, "timing"]:
        cmd = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    step_s = results.pop()
    for r in results:
        r["step_s"] = step_s[r["variant"]]
        r["tokens_per_s"] = args.batch * _seq(r["variant"], args) / r["step_s"]
    full = next((r for r in results if r["variant"] == "full"), None)
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    print(f"{args.model}, batch {args.batch} x {args.seq} tokens, AdamW, {args.device} ({args.threads} threads), "
          f"{platform.machine()}, {os.cpu_count()} cores")
    print("| variant | trainable | optimizer state MiB | grads MiB | saved activations MiB | train state MiB | "
          "peak MiB | step s | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rel = f" ({r['step_s'] / full['step_s']:.2f}x)" if full else ""
        print(f"| {r['variant']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
              f"{mib(r['optimizer_state_bytes'])} | {mib(r['grad_bytes'])} | {mib(r['saved_activation_bytes'])} | "
              f"{mib(r['train_state_bytes'])} | {mib(r['peak_bytes'])} | {r['step_s']:.2f}{rel} | "
              f"{r['tokens_per_s']:.0f} |")
    print(f"peak: {results[0]['peak_kind']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

if __name__ == "__main__":
    main()
