"""Step time of lmkit-pipeline schedules vs the single-process run (CPU, gloo).

    python tools/bench_pipeline.py                      # 2 ranks, every schedule, 2/4/8 micro-batches
    python tools/bench_pipeline.py --layers 8 --d-model 256 --rows 32 --schedules 1f1b zbv_zero_bubble:2

One optimizer step = forward + backward of ``--rows`` sequences of ``--seq-len`` tokens
(a GPT of ``--layers`` blocks), gradient sync, global-norm clipping and AdamW. The
single-process baseline is the same step with the same micro-batches (gradient
accumulation, loss over the step's targets as lmkit's LMModule does) on one process of one
thread; each pipeline rank is a process of one thread. Baseline and pipeline steps alternate
(rank 0 runs a baseline step while the other ranks wait, then all run a pipeline step), so
that load from elsewhere on the machine hits both alike; the fastest step of each is
reported. Needs lmkit and lmkit-pipeline installed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SCHEDULES = ["gpipe:1", "1f1b:1", "interleaved_1f1b:2", "looped_bfs:2", "interleaved_zero_bubble:2",
                     "zbv_zero_bubble:2", "dualpipev:2"]


def _overrides(a) -> list[str]:
    return [f"model.n_layer={a.layers}", f"model.d_model={a.d_model}", f"model.n_head={a.heads}",
            f"model.max_seq_len={a.seq_len}", f"data.seq_len={a.seq_len}", f"data.batch_size={a.rows}",
            "data.grad_accum=1", "trainer.accelerator=cpu", "trainer.devices=1", "logger=none", "callbacks=[]",
            "trainer.progress_bar=false"]


def _setup(a):
    import torch

    from lmkit.api import build, load_run_config

    overrides = _overrides(a)
    built = build(overrides, tempfile.mkdtemp(prefix="bench-pp-"))
    loader = iter(built.datamodule.train_dataloader())
    batches = [next(loader)["micro_batches"] for _ in range(a.warmup + a.steps)]
    torch.manual_seed(0)
    return built.module, load_run_config(overrides), batches


def _baseline_step(lm, opt, n_mb):
    """Single process: the step's rows in n micro-batches, loss over the step's targets (as LMModule)."""
    import torch

    def step(mbs):
        batch = {k: torch.cat([mb[k] for mb in mbs]) for k in mbs[0]}
        split = {k: torch.tensor_split(v, n_mb) for k, v in batch.items()}
        targets = float(lm.objective.count_targets(batch))
        for i in range(n_mb):
            (lm.objective.loss(lm.model, {k: v[i] for k, v in split.items()}).loss_sum / targets).backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(a, out: str) -> None:
    """One rank: every schedule × micro-batch count in one process group, alternating with the baseline."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from lmkit_pipeline.config import PipelineConfig
    from lmkit_pipeline.runtime import PipelineRuntime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    pristine, run, batches = _setup(a)
    pipe, base = {}, {}
    for spec in a.schedules:
        schedule, spr = spec.split(":") if ":" in spec else (spec, "1")
        for n_mb in a.microbatches:
            key = f"{schedule}:{spr}:{n_mb}"
            try:
                cfg = PipelineConfig(pp_size=dist.get_world_size(), stages_per_rank=int(spr), schedule=schedule,
                                     n_microbatches=n_mb)
            except Exception as e:  # e.g. 1f1b with fewer micro-batches than stages
                pipe[key] = f"n/a ({str(e).split(':')[0]})"
                continue
            lm = copy.deepcopy(pristine)
            runtime = PipelineRuntime(cfg)
            runtime.setup(lm, run)
            opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
            if rank == 0:
                ref = copy.deepcopy(pristine)
                ref_step = _baseline_step(ref, torch.optim.AdamW(ref.parameters(), lr=1e-4), n_mb)
            pipe[key], times = [], base.setdefault(str(n_mb), [])
            for i, mbs in enumerate(batches):
                dist.barrier()
                if rank == 0:
                    t0 = time.perf_counter()
                    ref_step(mbs)
                    if i >= a.warmup:
                        times.append(time.perf_counter() - t0)
                dist.barrier()
                t0 = time.perf_counter()
                runtime.forward_backward(lm, mbs)
                runtime.clip_grad_norm_(1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= a.warmup:
                    pipe[key].append(time.perf_counter() - t0)
            del runtime, lm, opt
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pipe)
    if rank == 0:
        merged = {}
        for key, value in pipe.items():  # a step lasts as long as its slowest rank
            merged[key] = value if isinstance(value, str) else [max(g[key][i] for g in gathered) for i in range(len(value))]
        Path(out).write_text(json.dumps({"pipeline": merged, "baseline": base}))
    dist.destroy_process_group()


def _argv(a) -> list[str]:
    return ["--layers", str(a.layers), "--d-model", str(a.d_model), "--heads", str(a.heads), "--seq-len",
            str(a.seq_len), "--rows", str(a.rows), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--microbatches", *map(str, a.microbatches), "--schedules", *a.schedules]


def _run(cmd, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="pipeline ranks (pp_size)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--schedules", nargs="+", default=DEFAULT_SCHEDULES, help="schedule[:stages_per_rank]")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        from lmkit.process_exit import exit_process

        worker(a, a.worker)
        exit_process(0)  # gloo threads alive at interpreter finalization can abort a rank

    tmp = Path(tempfile.mkdtemp(prefix="bench-pp-"))
    out = tmp / "bench.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}", __file__,
          "--worker", str(out), *_argv(a)], a.timeout)
    result = json.loads(out.read_text())
    pipe, base = result["pipeline"], result["baseline"]

    fastest = lambda xs: min(xs) * 1000  # noqa: E731
    print(f"GPT {a.layers}×{a.d_model}, {a.rows}×{a.seq_len} tokens per step, pp={a.nproc} (1 thread per rank); "
          f"fastest of {a.steps} steps, ms")
    print()
    width = 40
    print(f"| {'run':<{width}} | " + " | ".join(f"{f'{n} micro-batches':>15}" for n in a.microbatches) + " |")
    print("|" + "|".join(["-" * (width + 2)] + ["-" * 17] * len(a.microbatches)) + "|")
    ref = {n: fastest(base[str(n)]) for n in a.microbatches if str(n) in base}
    rows = {"single process, 1 thread": ref}
    print(f"| {'single process, 1 thread':<{width}} | "
          + " | ".join(f"{ref[n]:15.1f}" if n in ref else f"{'n/a':>15}" for n in a.microbatches) + " |")
    for spec in a.schedules:
        schedule, spr = spec.split(":") if ":" in spec else (spec, "1")
        label = f"{schedule} ({spr} stage{'s' if spr != '1' else ''}/rank)"
        cells, rows[label] = [], {}
        for n in a.microbatches:
            value = pipe[f"{schedule}:{spr}:{n}"]
            if isinstance(value, str):
                cells.append(f"{'n/a':>15}")
                continue
            rows[label][n] = ms = fastest(value)
            cells.append(f"{ms:8.1f} ×{ref[n] / ms:5.2f}")
        print(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    print()
    print("×: speed-up against the single process (1 thread) with the same micro-batches; "
          "n/a: the schedule needs more micro-batches.")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "ms": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
