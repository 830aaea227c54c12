"""Distillation under FSDP2 (2 ranks, CPU/gloo): the teacher is sharded like the student, and the run
equals the same 2-rank run under DDP with a replicated teacher (losses and student parameters to 1e-5).

The reference has 2 ranks too: MLM masks are drawn per micro-batch (seeded by its first example's
stream position), so 1 x 8 windows are not masked as 2 x 4 are."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.fixture(scope="module")
def teacher(launcher):
    r = launcher.run("teacher", ["+objective=mlm", "model=bert_tiny", "model.dropout=0.1", "data.batch_size=8",
                                 "trainer.max_steps=3", "trainer.devices=1"])
    return r["run_dir"]


def _student(teacher):
    return ["+objective=distillation", f"objective.teacher={teacher}", "model=bert_tiny", "model.n_layer=1",
            "objective.init_from_teacher=false", "trainer.max_steps=3"]


def test_fsdp_distillation_shards_the_teacher_and_matches_one_process(launcher, teacher):
    ref = launcher.run("distill_ddp2", _student(teacher) + ["strategy=ddp", "data.batch_size=4", "trainer.devices=2"],
                       nproc=2)
    fsdp = launcher.run("distill_fsdp2", _student(teacher) + ["strategy=fsdp", "data.batch_size=4", "trainer.devices=2"],
                        nproc=2)
    assert fsdp["world"] == 2 and fsdp["steps"] == 3
    # each rank holds about half of the teacher's parameter elements (sharded, not replicated)
    assert all(abs(f - 0.5) < 0.02 for f in fsdp["frozen_fractions"]), fsdp["frozen_fractions"]
    assert ref["frozen_fractions"] == [1.0, 1.0]  # DDP: every rank holds the whole teacher
    err = max(abs(a - b) for a, b in zip(fsdp["losses"], ref["losses"]))
    assert len(fsdp["losses"]) == 3 and err < TOL, (fsdp["losses"], ref["losses"])
    diff = max((fsdp["state"][k] - ref["state"][k]).abs().max().item() for k in ref["state"])
    assert set(fsdp["state"]) == set(ref["state"]) and diff < TOL, diff
