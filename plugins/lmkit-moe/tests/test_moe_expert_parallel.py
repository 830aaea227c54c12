"""Expert parallelism on 2 gloo ranks (4 experts, 2 per rank) vs a single process."""
import socket
import time

import pytest
import torch.multiprocessing as mp

import moe_ep_worker

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_matches_single_process_and_survives_empty_ranks():
    ctx = mp.start_processes(moe_ep_worker.worker, args=(2, _free_port()), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"expert-parallel workers did not finish in {TIMEOUT_S}s (hang?)")
