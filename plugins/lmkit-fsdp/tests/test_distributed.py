"""Multi-process training on CPU/gloo against a single-process reference.

lmkit's ``data.batch_size`` is a micro-batch per data-parallel rank and the sampler gives
each rank its slice of the step's stream, so 2 ranks x batch 4 see exactly the 8 windows
of 1 rank x batch 8, in the same order; tensor-parallel peers share their data. The runs
chain: reference (1 process, plain, 7 steps) | FSDP on 2 ranks, steps 1-3 | resumed by FSDP
on 1 rank, steps 4-5 | resumed by FSDP x TP (tp=2) on 2 ranks, steps 6-7 — and compare
losses and parameters with the reference at each stage (tolerance 1e-5).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fsdp_helpers import RUN_TIMEOUT, TINY, _env

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(launcher):
    r = launcher.run("reference", ["data.batch_size=8", "trainer.max_steps=7", "trainer.devices=1",
                                   "trainer.checkpoint_every_n_steps=1", "trainer.keep_last_k=-1"])
    ckpts = r["run_dir"] / "checkpoints"
    r["params_at"] = {s: {k: v.float() for k, v in torch.load(ckpts / f"step{s:06d}.ckpt", weights_only=True)["state_dict"].items()
                          if k.startswith("model.")} for s in (3, 5)}
    r["params_at"][7] = r["state"]
    return r


@pytest.fixture(scope="module")
def fsdp2(launcher):
    return launcher.run("fsdp2", ["strategy=fsdp", "data.batch_size=4", "trainer.max_steps=3", "trainer.devices=2"], nproc=2)


def max_param_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_losses(got, want, what):
    assert len(got) == len(want), (what, got, want)
    err = max(abs(g - w) for g, w in zip(got, want))
    assert err < TOL, f"{what}: losses {got} vs reference {want} (max error {err:.2e})"


def test_fsdp_two_ranks_match_single_process(reference, fsdp2):
    assert fsdp2["world"] == 2 and fsdp2["steps"] == 3
    # each rank holds about half of the parameter elements
    assert all(abs(f - 0.5) < 0.02 for f in fsdp2["fractions"]), fsdp2["fractions"]
    assert_losses(fsdp2["losses"], reference["losses"][:3], "fsdp 2 ranks")
    assert max_param_diff(fsdp2["state"], reference["params_at"][3]) < TOL
    last = fsdp2["run_dir"] / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank


@pytest.fixture(scope="module")
def resumed_on_1(launcher, fsdp2):
    last = fsdp2["run_dir"] / "checkpoints" / "last.ckpt"
    return launcher.run("resume_on_1", ["strategy=fsdp", "data.batch_size=8", "trainer.max_steps=5", "trainer.devices=1",
                                        f"resume={last}"])


def test_saved_on_two_ranks_resumed_on_one(reference, resumed_on_1):
    assert resumed_on_1["steps"] == 5 and resumed_on_1["world"] == 1
    assert_losses(resumed_on_1["losses"], reference["losses"][3:5], "saved on 2 ranks, resumed on 1")
    assert max_param_diff(resumed_on_1["state"], reference["params_at"][5]) < TOL
    assert len(list((resumed_on_1["run_dir"] / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 1


def test_tensor_parallel_resumed_on_two_ranks(launcher, reference, resumed_on_1, tmp_path):
    """Saved by FSDP on 1 rank, resumed with TP=2 on 2 ranks (steps 6-7): resharding, the fused-qkv
    layout split on load and fused again on save, and TP training parity with the reference."""
    last1 = resumed_on_1["run_dir"] / "checkpoints" / "last.ckpt"
    tp = launcher.run("tp2", ["strategy=fsdp_tp", "strategy.tensor_parallel_size=2", "data.batch_size=8",
                              "trainer.max_steps=7", "trainer.devices=2", f"resume={last1}"], nproc=2)
    assert tp["world"] == 2 and tp["steps"] == 7
    assert_losses(tp["losses"], reference["losses"][5:7], "saved on 1 rank (fsdp), resumed on 2 (fsdp_tp, tp=2)")
    assert max_param_diff(tp["state"], reference["params_at"][7]) < TOL
    # its checkpoint is in the plain layout (fused qkv): it consolidates into the plain model's weights
    from lmkit_fsdp.consolidate import consolidate

    out = consolidate(tp["run_dir"] / "checkpoints" / "last.ckpt", tmp_path / "tp.ckpt")
    sd = torch.load(out, weights_only=True)["state_dict"]
    assert max_param_diff({k: v for k, v in sd.items() if k.startswith("model.")}, reference["params_at"][7]) < TOL


def test_consolidated_checkpoint_resumes_plain_run(launcher, reference, fsdp2, tmp_path):
    from lmkit.checkpoint import load_checkpoint_file

    from lmkit_fsdp.consolidate import main as consolidate_main

    out = tmp_path / "consolidated.ckpt"  # python -m lmkit_fsdp.consolidate LAST OUT
    assert consolidate_main([str(fsdp2["run_dir"] / "checkpoints" / "last.ckpt"), str(out)]) == 0
    ckpt = load_checkpoint_file(out)  # weights_only=True
    assert ckpt["global_step"] == 3 and len(ckpt["optimizer_states"]) == 1
    plain = launcher.run("plain_from_consolidated", ["data.batch_size=8", "trainer.max_steps=5", "trainer.devices=1",
                                                     f"resume={out}"])
    assert_losses(plain["losses"], reference["losses"][3:5], "consolidated checkpoint resumed by a plain run")
    assert max_param_diff(plain["state"], reference["params_at"][5]) < TOL


def test_two_nodes(launcher, reference):
    """Two torchrun agents (``--nnodes 2 --node-rank 0/1``) on 127.0.0.1, one rank each."""
    r = launcher.run("two_nodes", ["strategy=fsdp", "data.batch_size=4", "trainer.max_steps=3", "trainer.devices=1",
                                   "trainer.num_nodes=2"], nproc=1, nnodes=2)
    assert r["world"] == 2
    assert_losses(r["losses"], reference["losses"][:3], "2 nodes x 1 rank")


def test_cli_contract_command(launcher, tmp_path):
    """``python -m lmkit strategy=fsdp trainer.devices=2 trainer.accelerator=cpu`` (Lightning launches rank 1)."""
    run_dir = tmp_path / "cli"
    args = [a for a in TINY if not a.startswith("trainer.accelerator")]
    cmd = [sys.executable, "-m", "lmkit", "strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
           "trainer.max_steps=2", "data.batch_size=2", f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_env(launcher.cache), cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "trained 2 steps" in proc.stdout
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2


@pytest.mark.parametrize("strategy", [["strategy=fsdp", "data.batch_size=4"],  # 2 data-parallel ranks
                                      ["strategy=fsdp_tp", "strategy.tensor_parallel_size=2", "data.batch_size=8"]],
                         ids=["fsdp", "fsdp_tp"])
def test_chunked_lm_head_loss_matches_the_reference(launcher, reference, strategy):
    """``objective.chunked_ce`` (fused LM head + loss over token chunks) with the head's weight
    sharded by FSDP (and with tensor-parallel blocks): same losses and parameters as the plain
    single-process run."""
    name = strategy[0].split("=")[1]
    r = launcher.run(f"{name}_chunked", strategy + ["trainer.max_steps=3", "trainer.devices=2", "+objective=causal_lm",
                                                   "objective.chunked_ce=16"], nproc=2)
    assert_losses(r["losses"], reference["losses"][:3], f"{name} chunked_ce")
    assert max_param_diff(r["state"], reference["params_at"][3]) < TOL
