"""End-to-end: MoE GPTs trained through lmkit's run path (config → hooks → Lightning).

* A switch GPT (``model.moe.num_experts=4``) trains on the built-in corpus: the loss falls,
  the aux/z losses and the per-layer metrics reach the CSV log as scalars, and the
  ``moe_balance`` callback reports a bounded max/min expert load ratio.
* Invalid MoE / expert-parallel settings are ConfigErrors before anything trains.
* ``strategy=expert_parallel`` on 2 CPU/gloo ranks (torchrun, with timeouts) matches a
  single-process run with the same global batch step by step, writes checkpoints holding
  every expert (model and optimizer state), and its checkpoint resumes both on 2 ranks and
  in a single process.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_run_worker

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "moe_run_worker.py"
RUN_TIMEOUT = 150  # seconds for one torchrun launch; a hang fails the test
TOL = 1e-5

try:
    sys.path.insert(0, str(HERE.parents[2] / "tests"))
    from lmkit_test_utils import TINY
except ImportError:  # the plugin outside the lmkit repository
    TINY = [
        "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.max_seq_len=64",
        "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.val_batches=2", "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false",
        "logger=none", "scheduler.warmup_steps=1", "callbacks=[]",
    ]
finally:
    sys.path.pop(0)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """Tokenized corpora go to a temporary cache (shared with the torchrun workers)."""
    old = os.environ.get("LMKIT_CACHE")
    cache = os.environ.setdefault("LMKIT_CACHE", str(tmp_path_factory.mktemp("lmkit-cache")))
    yield Path(cache)
    if old is None:
        os.environ.pop("LMKIT_CACHE", None)


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- single process

def test_switch_gpt_trains_logs_aux_losses_and_stays_balanced(tmp_path, capsys):
    import lmkit.api

    summary = lmkit.api.run(TINY + [
        "model.n_layer=2", "model.moe.num_experts=4", "model.moe.every=1", "trainer.max_steps=30",
        "trainer.val_check_interval=15", "logger=csv", "trainer.log_every_n_steps=1", "callbacks=[moe_balance]",
    ], tmp_path)
    assert summary["steps"] == 30
    start, end = summary["start"]["val/loss"], summary["end"]["val/loss"]
    assert end < start - 0.8, (start, end)

    rows = read_csv(tmp_path)
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 30
    losses = [float(r["train/loss"]) for r in train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8, losses
    layers = ("blocks.0.mlp", "blocks.1.mlp")
    for r in train:
        aux, z = float(r["train/moe_aux_loss"]), float(r["train/moe_z_loss"])
        # weighted: 0.01 · N·Σ fᵢPᵢ (0.01 when uniform, 0.04 = all on one expert) and 1e-3 · mean(lse²)
        assert 0.005 < aux < 0.04 and 0 < z < 0.1, (aux, z)
        for layer in layers:   # per-layer metrics: one scalar per column
            load = [float(r[f"train/{layer}/expert_load/{i}"]) for i in range(4)]
            assert abs(sum(load) - 1) < 1e-5 and min(load) >= 0, load
            assert 0 <= float(r[f"train/{layer}/dropped_fraction"]) < 1
            assert float(r[f"train/{layer}/aux_loss"]) > 0 and float(r[f"train/{layer}/z_loss"]) > 0

    final = [r for r in rows if r.get("moe_balance/max_min_ratio")]
    assert len(final) == 1
    ratio = float(final[0]["moe_balance/max_min_ratio"])
    per_layer = {layer: float(final[0][f"moe_balance/{layer}/max_min_ratio"]) for layer in layers}
    out = capsys.readouterr().out
    assert "lmkit-moe: expert load max/min" in out
    print(f"\nexpert load max/min over the last 30 steps: {per_layer} (val loss {start:.3f} -> {end:.3f})")
    assert math.isfinite(ratio) and 1.0 <= ratio < 3.0, per_layer


@pytest.mark.parametrize("bad, needle", [
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "top_k=5 is larger than moe.num_experts=4"),
    (["model.moe.num_experts=4", "model.moe.capacity_factor=0"], "capacity_factor must be a finite number > 0"),
    (["model.moe.num_experts=4", "model.moe.eval_capacity_factor=-1"], "eval_capacity_factor"),
    (["model.moe.num_experts=4", "model.moe.dispatch=fast"], "dispatch must be one of"),
    (["model.moe.num_experts=4", "model.moe.topk=2"], "topk"),
])
def test_invalid_moe_settings_are_config_errors(bad, needle):
    import lmkit.api
    from lmkit.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        lmkit.api.load_run_config(TINY + bad)


@pytest.mark.parametrize("bad, needle", [
    (["model.moe.num_experts=3"], "num_experts=3 is not divisible by the expert-parallel size 2"),
    ([], "the model has none"),
])
def test_expert_parallel_refused_before_any_process_starts(tmp_path, bad, needle):
    import lmkit.api
    from lmkit.errors import ConfigError

    ep = ["strategy=expert_parallel", "trainer.accelerator=cpu", "trainer.devices=2"]
    with pytest.raises(ConfigError, match=needle):
        lmkit.api.build(TINY + ep + bad, tmp_path)
    with pytest.raises(ConfigError, match="needs strategy=expert_parallel"):
        lmkit.api.build(TINY + ["model.moe.num_experts=4", "model.moe.expert_parallel=true"], tmp_path)


def test_strategy_config_ships_with_the_plugin():
    import lmkit.api
    import lmkit_moe

    yaml = Path(lmkit_moe.__file__).parent / "conf" / "strategy" / "expert_parallel.yaml"
    assert yaml.is_file()
    run = lmkit.api.load_run_config(TINY + ["model.moe.num_experts=4", "strategy=expert_parallel",
                                            "strategy.timeout_s=60"])
    assert run.strategy.name == "expert_parallel" and run.strategy.timeout_s == 60


# --------------------------------------------------------------------------- expert parallel

# 2 MoE layers of 4 experts, no token dropped (dropless) and no router jitter, so that 2
# ranks x 2 windows and 1 process x 2 micro-batches of 2 windows see the same tokens
# routed the same way (the aux losses are per micro-batch in both). Adam eps 1e-6 keeps
# near-zero gradients from amplifying float rounding in the parameter comparison.
EP_BASE = TINY + [
    "model.n_layer=2", "model.moe.num_experts=4", "model.moe.dropless=true", "model.moe.jitter=0",
    "data.batch_size=2", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.val_batches=4",
    "trainer.checkpoint_every_n_steps=2", "trainer.accelerator=cpu", "optimizer.eps=1e-6",
    "callbacks=[moe_balance]",
]
EP = ["strategy=expert_parallel", "strategy.timeout_s=60", "trainer.devices=2"]
SINGLE = ["data.grad_accum=2", "trainer.devices=1"]


def _tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(ln for ln in text.splitlines() if "Warning" not in ln and "warn(" not in ln)[-n:]


def _torchrun(args: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                                start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers
            proc.wait()
            pytest.fail(f"expert-parallel run did not finish in {RUN_TIMEOUT}s (hang?):\n{_tail(log)}")
    if proc.returncode != 0:
        pytest.fail(f"expert-parallel run failed (exit {proc.returncode}):\n{_tail(log)}")


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_expert_parallel_two_ranks_match_single_process_and_resume(tmp_path):
    import lmkit.api

    # 2 ranks: steps 1-4 (checkpoints at 2 and 4), then resumed from step 2 on 2 ranks with an
    # odd number of validation batches (3: the ranks must still run equal counts).
    out = tmp_path / "ep.json"
    _torchrun([str(out), str(tmp_path / "ep"), str(tmp_path / "ep_resumed"), "--", *EP_BASE, *EP,
               "--", "trainer.val_batches=3"], tmp_path / "ep.log")
    ep = json.loads(out.read_text())
    assert ep["world"] == 2 and ep["resumed_steps"] == 4
    assert "expert load max/min" in (tmp_path / "ep.log").read_text()

    # the same global batch in one process: 2 micro-batches of 2 windows per step
    single = moe_run_worker.train_recorded(EP_BASE + SINGLE, str(tmp_path / "single"))
    assert single["world"] == 1
    for what in ("train", "val"):
        assert len(ep[what]) == len(single[what]) == {"train": 4, "val": 2}[what]
        err = max(abs(a - b) for a, b in zip(ep[what], single[what]))
        assert err < TOL, f"{what} losses: expert parallel {ep[what]} vs single process {single[what]}"
        print(f"\n{what} losses, 2 ranks vs 1 process: max |difference| {err:.1e} over {ep[what]}")

    # the checkpoints hold every expert: same tensors as the single process's, model and optimizer
    ep_last = _ckpt(tmp_path / "ep" / "checkpoints" / "last.ckpt")
    single_last = _ckpt(tmp_path / "single" / "checkpoints" / "last.ckpt")
    assert ep_last["state_dict"]["model.blocks.1.mlp.experts.fc_weight"].shape[0] == 4
    diff = _max_diff(ep_last["state_dict"], single_last["state_dict"])
    assert diff < TOL, f"parameters after 4 steps: expert parallel vs single process differ by {diff:.2e}"
    print(f"parameters after 4 steps, 2 ranks vs 1 process: max |difference| {diff:.1e}")
    ep_opt, single_opt = ep_last["optimizer_states"][0]["state"], single_last["optimizer_states"][0]["state"]
    assert set(ep_opt) == set(single_opt)
    for idx in ep_opt:
        for key in ("exp_avg", "exp_avg_sq"):
            assert ep_opt[idx][key].shape == single_opt[idx][key].shape
            torch.testing.assert_close(ep_opt[idx][key], single_opt[idx][key], atol=TOL, rtol=1e-4)

    # resumed from step 2: on 2 ranks (above), and in one process (through the CLI's run path)
    step2 = tmp_path / "ep" / "checkpoints" / "step000002.ckpt"
    summary = lmkit.api.run(EP_BASE + SINGLE + [f"resume={step2}"], tmp_path / "single_resumed")
    assert summary["steps"] == 4
    for resumed in ("ep_resumed", "single_resumed"):
        got = _ckpt(tmp_path / resumed / "checkpoints" / "last.ckpt")
        assert got["global_step"] == 4
        diff = _max_diff(got["state_dict"], ep_last["state_dict"])
        assert diff < TOL, f"{resumed}: parameters differ from the uninterrupted run by {diff:.2e}"
