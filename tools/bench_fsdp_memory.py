"""Per-rank memory of parameters, gradients and optimizer state under lmkit-fsdp (CPU, gloo).

    python tools/bench_fsdp_memory.py                       # FSDP on 1, 2 and 4 ranks
    python tools/bench_fsdp_memory.py --ranks 2 4 --tp 2    # FSDP x tensor parallel (tp=2)
    python tools/bench_fsdp_memory.py --n-layer 12 --d-model 768 --n-head 12 --vocab 50304   # GPT-2 124M

For each world size it spawns that many processes (torch.multiprocessing, gloo), builds the
same GPT, applies lmkit_fsdp's parallelize (TP, then FSDP2 per block and at the root), runs
one AdamW step on random tokens, and counts the bytes each rank holds: its parameter shards,
its gradient shards and its optimizer-state shards (Adam: exp_avg, exp_avg_sq, step). The
numbers are exact tensor sizes (not process RSS), so they do not depend on the allocator.
Needs the lmkit-fsdp plugin installed (``pip install -e plugins/lmkit-fsdp``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit_fsdp.config import FSDPConfig, FSDPTPConfig
    from lmkit_fsdp.parallelize import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tp = args.tp if world % args.tp == 0 and world >= args.tp else 1
        cfg = FSDPTPConfig(tensor_parallel_size=tp) if tp > 1 else FSDPConfig()
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, vocab_size=args.vocab,
                              max_seq_len=args.seq_len))
        full_params = sum(p.numel() * p.element_size() for p in model.parameters())

        class Holder(nn.Module):  # what parallelize expects of lmkit's LMModule
            def __init__(self):
                super().__init__()
                self.model, self.objective = model, nn.Module()
                self.device_mesh = mesh

        holder = Holder()
        parallelize(holder, None, cfg)
        opt = torch.optim.AdamW(holder.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(rank // tp)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
        hidden = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        params = sum(_local_bytes(p) for p in model.parameters())
        grads = sum(_local_bytes(p.grad) for p in model.parameters())
        state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        row = {"rank": rank, "params": params, "grads": grads, "optim": state, "full_params": full_params}
        with open(os.path.join(out_dir, f"{world}_{rank}.json"), "w") as f:
            json.dump(row, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    from lmkit.process_exit import exit_process

    exit_process(0)  # gloo threads alive at interpreter finalization can abort a rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (used where it divides the world size)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)

    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for world in args.ranks:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            rows[world] = [json.load(open(os.path.join(out, f"{world}_{r}.json"))) for r in range(world)]

    mb = 1 / 2**20
    full = rows[args.ranks[0]][0]["full_params"]
    print(f"GPT n_layer={args.n_layer} d_model={args.d_model} n_head={args.n_head} vocab={args.vocab}: "
          f"{full / 4 / 1e6:.2f}M fp32 parameters = {full * mb:.1f} MiB; AdamW; tp={args.tp}")
    print(f"{'ranks':>5} {'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'total MiB':>10} {'vs 1 rank':>10}   "
          f"(max over ranks)")
    base = None
    for world, rs in rows.items():
        worst = max(rs, key=lambda r: r["params"] + r["grads"] + r["optim"])
        total = worst["params"] + worst["grads"] + worst["optim"]
        base = base or (total if world == 1 else 4 * full)
        print(f"{world:>5} {worst['params'] * mb:>11.2f} {worst['grads'] * mb:>10.2f} {worst['optim'] * mb:>10.2f} "
              f"{total * mb:>10.2f} {total / base:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
