"""Multi-process tests (torchrun, gloo): every schedule against the single-process run, a 20-step
loss curve, checkpoint/resume, pipeline × data parallel, two nodes, and fast failure on bad input.

Each launch is a subprocess killed after a timeout, so a hang fails the test.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from pp_common import PIPELINE, REF_STEPS, tail, torchrun, train_losses, val_losses

TIMEOUT = 150


def _json(path):
    return json.loads(open(path).read())


def _assert_curve(run_dir, reference_dir, steps=range(REF_STEPS), tol=1e-5):
    got, ref = train_losses(run_dir), train_losses(reference_dir)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], abs=tol), f"step {step}: {got[step]} vs {ref[step]}"


def test_every_schedule_matches_single_process_step(tmp_path):
    """2 ranks: loss, every gradient, the clipped norm and a validation batch of one pipelined step
    equal the single-process full-batch step, for every schedule (plus aux losses on two)."""
    out = tmp_path / "grads.json"
    torchrun(["grads", str(out)], nproc=2, timeout=TIMEOUT)
    results = _json(out)
    assert len(results) == 10
    for name, r in results.items():
        assert r["missing"] == [] and r["n_grads"] == r["n_ref_grads"], name
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-5), name
        assert r["max_grad_diff"] < 1e-5, (name, r["worst"], r["max_grad_diff"])
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5), name
        assert r["val_loss"] == pytest.approx(r["ref_val_loss"], abs=1e-5), name
        assert r["val_nll"] == pytest.approx(r["ref_val_nll"], rel=1e-6), name
        for k, v in r["ref_aux_logs"].items():
            assert r["aux_logs"][k] == pytest.approx(v, rel=1e-5), name
        assert r["sizes"] == ([2, 2] if "spr1" in name else [1, 1, 1, 1]), name


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory, reference):
    """20 steps of zbv_zero_bubble on 2 ranks (checkpoints at 10 and 20), then pipelined resumes at step 10:
    from its own checkpoint, and from the single-process reference's."""
    root = tmp_path_factory.mktemp("pipelined")
    first, resumed, from_single = root / "pp", root / "pp_resumed", root / "pp_from_single"
    ref_ckpt = reference[0] / "checkpoints" / "step000010.ckpt"
    torchrun(["resume", str(root / "out.json"), str(first), str(resumed), str(ref_ckpt), str(from_single)] + PIPELINE + [
        "trainer.devices=2", "data.batch_size=4", "strategy.schedule=zbv_zero_bubble", "strategy.stages_per_rank=2",
        "strategy.n_microbatches=4"], nproc=2, timeout=TIMEOUT)
    return first, resumed, from_single


def test_loss_curve_matches_single_process(pipelined, reference):
    first, *_ = pipelined
    ref_dir, _ = reference
    _assert_curve(first, ref_dir)
    got_val, ref_val = val_losses(first), val_losses(ref_dir)
    assert sorted(got_val) == sorted(ref_val) and len(ref_val) == 3  # start, step 10, end
    for step in ref_val:
        assert got_val[step] == pytest.approx(ref_val[step], abs=1e-5)


def test_resume_continues_the_same_curve(pipelined):
    """Resumed at step 10 (pipelined): the same losses as the uninterrupted run."""
    first, resumed, _ = pipelined
    first_losses, resumed_losses = train_losses(first), train_losses(resumed)
    assert sorted(resumed_losses) == list(range(10, REF_STEPS))
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(first_losses[step], abs=1e-6)


def test_checkpoint_is_the_single_process_format(pipelined, reference):
    """The stages' parts are reassembled into the whole model's state and optimizer state."""
    first, *_ = pipelined
    ref_dir, _ = reference
    pp_ckpt = torch.load(first / "checkpoints" / "step000010.ckpt", weights_only=True)
    ref_ckpt = torch.load(ref_dir / "checkpoints" / "step000010.ckpt", weights_only=True)
    assert list(pp_ckpt["state_dict"]) == list(ref_ckpt["state_dict"])
    for key, value in ref_ckpt["state_dict"].items():
        torch.testing.assert_close(pp_ckpt["state_dict"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    pp_opt, ref_opt = pp_ckpt["optimizer_states"][0], ref_ckpt["optimizer_states"][0]
    assert [len(g["params"]) for g in pp_opt["param_groups"]] == [len(g["params"]) for g in ref_opt["param_groups"]]
    assert sorted(pp_opt["state"]) == sorted(ref_opt["state"])
    for i, state in ref_opt["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(pp_opt["state"][i][k], v, atol=1e-5, rtol=1e-4, msg=f"{i}.{k}")
    assert pp_ckpt["lmkit"]["data_steps"] == ref_ckpt["lmkit"]["data_steps"] == 10


def test_single_process_resumes_a_pipeline_checkpoint(pipelined, reference, tmp_path):
    from lmkit.api import run

    first, *_ = pipelined
    ref_dir, _ = reference
    run(PIPELINE[:-2] + ["data.batch_size=4", "trainer.devices=1", f"resume={first / 'checkpoints' / 'step000010.ckpt'}"],
        tmp_path)
    _assert_curve(tmp_path, ref_dir, steps=range(10, REF_STEPS))


def test_bad_input_fails_fast_on_every_rank(tmp_path):
    """Micro-batches that do not divide the batch: the ranks stop with the ConfigError, nothing hangs."""
    text = torchrun(["train", str(tmp_path / "out.json"), str(tmp_path / "run")] + PIPELINE + [
        "trainer.devices=2", "data.batch_size=6", "data.grad_accum=1", "strategy.n_microbatches=4"],
        nproc=2, timeout=90, check=False)
    reported = text.count("strategy.n_microbatches=4 does not divide the 6 rows of one step")
    # torchrun stops the other rank (SIGTERM) as soon as one fails: a slower rank may be stopped
    # before it reaches the check, so each rank either reported the error or was stopped
    stopped = len(re.findall(r"exitcode\s*:\s*-15 ", text))
    assert reported >= 1 and reported + stopped >= 2, tail(text)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_pipeline_times_data_parallel(tmp_path, reference):
    """pp=2 × dp=2 (4 processes, 1f1b): each replica reads its half of the batch; same curve."""
    ref_dir, _ = reference
    out = tmp_path / "out.json"
    torchrun(["train", str(out), str(tmp_path / "run")] + PIPELINE + [
        "trainer.devices=4", "data.batch_size=2", "strategy.schedule=1f1b", "strategy.n_microbatches=2",
        "strategy.dp_size=2"], nproc=4, timeout=TIMEOUT)
    _assert_curve(tmp_path / "run", ref_dir)
    ends = [_json(f"{out}.rank{r}")["end"] for r in range(4)]
    assert all(e == ends[0] for e in ends), ends  # validation metrics identical on every rank


@pytest.mark.slow
def test_two_nodes(tmp_path, reference):
    """Two `torchrun --nnodes 2 --node-rank {0,1}` launches on 127.0.0.1, one pipeline rank each."""
    ref_dir, ref_summary = reference
    out = tmp_path / "out.json"
    torchrun(["train", str(out), str(tmp_path / "run")] + PIPELINE + [
        "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=4", "strategy.schedule=interleaved_1f1b",
        "strategy.stages_per_rank=2", "strategy.n_microbatches=4"], nproc=1, nnodes=2, timeout=TIMEOUT)
    _assert_curve(tmp_path / "run", ref_dir)
    ends = [_json(f"{out}.rank{r}")["end"] for r in range(2)]
    assert ends[0] == ends[1]
    assert ends[0]["val/loss"] == pytest.approx(ref_summary["end"]["val/loss"], abs=1e-5)


def test_run_summary_counts_the_whole_model(pipelined, reference):
    """Each rank holds only its stages; the summary still reports the model's parameter count."""
    first, *_ = pipelined
    assert _json(first.parent / "out.json")["first"]["params"] == reference[1]["params"]


def test_pipeline_resumes_a_single_process_checkpoint(pipelined, reference):
    _, _, from_single = pipelined
    _assert_curve(from_single, reference[0], steps=range(10, REF_STEPS))
