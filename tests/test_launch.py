"""torchrun and SLURM: process counts from the launcher's environment, one run directory for all ranks,
one summary (rank 0)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from lmkit.errors import ConfigError
from lmkit.launch import Launch, apply_launch, detect_launch, shared_run_dir
from lmkit_test_utils import TINY

TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8", "RANK": "5"}


def trainer(devices="auto", num_nodes=1):
    from lmkit.config.schema import TrainerConfig

    return TrainerConfig(devices=devices, num_nodes=num_nodes)


def test_detects_torchrun_and_slurm_and_plain_processes():
    assert detect_launch(TORCHRUN_ENV) == Launch("torchrun", 4, 2, 5)
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)",
             "SLURM_JOB_NAME": "train"}
    assert detect_launch(slurm) == Launch("slurm", 8, 2, 3)
    assert detect_launch({**slurm, "SLURM_JOB_NAME": "bash"}) is None  # an interactive allocation
    assert detect_launch({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert detect_launch({}) is None


def test_devices_and_nodes_come_from_the_launcher():
    launch = detect_launch(TORCHRUN_ENV)
    t = apply_launch(trainer(), launch)
    assert (t.devices, t.num_nodes) == (4, 2)
    assert apply_launch(trainer(devices=4, num_nodes=2), launch).devices == 4  # agreeing values are fine
    with pytest.raises(ConfigError, match="trainer.devices=2 but torchrun started 4 processes per node"):
        apply_launch(trainer(devices=2), launch)
    with pytest.raises(ConfigError, match="trainer.num_nodes=3 but torchrun started 2 node"):
        apply_launch(trainer(num_nodes=3), launch)
    assert apply_launch(trainer(), None) is not None
    # API code under torchrun may build a one-process reference run: not refused, defaults still filled
    assert apply_launch(trainer(devices=1), launch, strict=False).devices == 1
    assert apply_launch(trainer(), launch, strict=False).devices == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_gets_rank_zeros_directory(monkeypatch):
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = _free_port()
    server = TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    got = {}
    # rank 1 asks first (it started a second earlier) and waits for rank 0's choice
    t = threading.Thread(target=lambda: got.__setitem__(1, shared_run_dir("outputs/d/10-00-01", Launch("torchrun", 2, 1, 1))))
    t.start()
    got[0] = shared_run_dir("outputs/d/10-00-02", Launch("torchrun", 2, 1, 0))
    t.join(30)
    assert got == {0: "outputs/d/10-00-02", 1: "outputs/d/10-00-02"}
    del server


def test_slurm_ranks_share_a_directory_named_by_the_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_START_TIME", "1700000000")
    a = shared_run_dir("outputs/x/1", Launch("slurm", 8, 2, 0))
    b = shared_run_dir("outputs/x/2", Launch("slurm", 8, 2, 9))
    assert a == b and a.endswith("/slurm-4242")


STRATEGIES = {  # strategy -> extra overrides (the plugins' strategies where installed)
    "ddp": [],
    "fsdp": [],
    "pipeline": ["model.n_layer=2"],
    "expert_parallel": ["model.n_layer=2", "model.moe.num_experts=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_torchrun_without_devices_trains_in_one_directory_with_one_summary(tmp_path, strategy):
    from lmkit.plugins import get_plugin_manager

    if strategy not in get_plugin_manager().registries["strategy"]:
        pytest.skip(f"the plugin providing strategy={strategy} is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "lmkit", f"strategy={strategy}", *TINY,
                          *STRATEGIES[strategy], "logger=csv"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("trained 4 steps") == 1, out.stdout  # only rank 0 prints the summary
    assert out.stdout.count("lmkit: run directory") == 1
    for text in ("sync_dist=True", "litlogger", "manual optimization"):  # nothing that does not apply
        assert text not in out.stdout + out.stderr, text
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").exists()
    assert str(run_dirs[0].name) in out.stdout.split("checkpoints:")[1]


@pytest.mark.slow
def test_torchrun_bad_input_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "lmkit", "strategy=ddp", "trainer.devices=3",
                          *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("lmkit: error:")]
    assert errors == ["lmkit: error: trainer.devices=3 but torchrun started 2 processes per node; drop "
                      "trainer.devices (it is taken from the launcher) or launch 3 processes per node."], out.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_run_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    """Lightning's distributed strategies set torch's thread count and MASTER_ADDR/PORT, LOCAL_RANK ...;
    a second run in the same process must not inherit them (other threads: other float rounding)."""
    import torch

    from lmkit.cli import main
    from lmkit.plugins import get_plugin_manager
    from lmkit.train import _LAUNCH_VARIABLES

    strategy = "fsdp" if "fsdp" in get_plugin_manager().registries["strategy"] else "ddp"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key in _LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)
    assert main(TINY + [f"strategy={strategy}", "trainer.devices=1", "trainer.accelerator=cpu"]) == 0
    assert torch.get_num_threads() == 1
    assert not [k for k in _LAUNCH_VARIABLES if k in os.environ]
