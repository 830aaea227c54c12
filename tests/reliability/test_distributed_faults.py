"""Distributed faults on 2 CPU/gloo ranks under torchrun.

One torchrun job, two faults: in the first attempt rank 1 hangs at step 3, so rank 0's next
collective fails after ``trainer.dist_timeout_s`` instead of torch's default 30 minutes; in
the second attempt rank 1 dies at step 5 (torchrun tears the other rank down). Each time
torchrun restarts the job (``--max-restarts 2``) and the same command resumes from the last
checkpoint of the fixed run directory (``hydra.run.dir=... resume=auto``).

The timeout also bounds how long ranks wait for each other while the process group is
created, so it must exceed the spread of the ranks' start-up times (30 s here, on a busy
2-core machine).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest

from lmkit.checkpoint import load_checkpoint_file
from lmkit_test_utils import TINY
from reliability_helpers import sub_env

DIST_TIMEOUT_S = 30
RUN_TIMEOUT_S = 300  # the whole torchrun job, both attempts; a hang fails the test


def test_dist_timeout_reaches_the_process_group_of_the_strategy(tmp_path):
    from lmkit.api import build

    built = build(TINY + ["strategy=ddp", "strategy.process_group_backend=gloo", "trainer.accelerator=cpu",
                          f"trainer.dist_timeout_s={DIST_TIMEOUT_S}"], tmp_path)
    assert built.trainer.strategy._timeout == timedelta(seconds=DIST_TIMEOUT_S)


@pytest.mark.slow
def test_hung_then_dead_rank_fail_fast_and_torchrun_restarts_resume(tmp_path, faults):
    run_dir = tmp_path / "outputs" / "job" / "run"
    args = [t for t in TINY if not t.startswith(("trainer.max_steps", "callbacks", "trainer.val_check_interval"))] + [
        "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=1000",
        "strategy=ddp", "strategy.process_group_backend=gloo", "trainer.accelerator=cpu", "trainer.devices=2",
        f"trainer.dist_timeout_s={DIST_TIMEOUT_S}", f"hydra.run.dir={run_dir}", "resume=auto",
        "callbacks=[fault_rank]",
    ]
    # torchrun shares its rendezvous TCPStore with the workers by default, and a restarted
    # worker can then read a peer address of the previous attempt (pytorch/pytorch#135712,
    # #167288): "Connection refused" at init. docs/reliability.md recommends this setting.
    env = sub_env(LMKIT_FAULT_PLAN="hang@3,die@5", LMKIT_FAULT_RANK=1, PYTHONWARNINGS="ignore",
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=2",
           "-m", "lmkit", *args]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
            pytest.fail(f"the job did not finish in {RUN_TIMEOUT_S}s (hang?):\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "fault: attempt 0: rank 1 hangs at step 3" in text and "fault: attempt 1: rank 1 dies at step 5" in text
    assert f"Timed out waiting {DIST_TIMEOUT_S * 1000}ms" in text  # rank 0 gave up on the hung rank
    assert text.count("resume=auto: no checkpoint") == 2  # attempt 0, both ranks: from scratch
    resumed = [line.rsplit("/", 1)[-1] for line in text.splitlines() if line.startswith("lmkit: resuming from")]
    assert resumed == ["last.ckpt"] * 4  # attempts 1 and 2, both ranks
    state = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 8 and state["lmkit"]["data_steps"] == 8
