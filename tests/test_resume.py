"""Checkpoint and exact resume: the resumed run's per-step losses equal the uninterrupted run's."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lmkit.api import run
from lmkit.checkpoint import load_checkpoint_file


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("extra", [
    [],  # plain
    ["data.grad_accum=2", "model.dropout=0.1"],  # accumulation + RNG-dependent dropout
])
def test_resumed_run_matches_uninterrupted_run(tmp_path, tiny, extra):
    common = tiny + extra + ["logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3",
                             "trainer.val_check_interval=3", "data.batch_size=8",
                             "scheduler.decay_steps=8"]  # the schedule's horizon must not depend on where a run stops
    full = run(common + ["trainer.max_steps=8"], tmp_path / "full")
    assert full["steps"] == 8
    run(common + ["trainer.max_steps=3"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(ckpt)
    assert state["global_step"] == 3 and state["lmkit"]["data_steps"] == 3
    resumed = run(common + ["trainer.max_steps=8", f"resume={ckpt}"], tmp_path / "resumed")
    assert resumed["steps"] == 8
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5, 6, 7]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_crosses_epoch_boundary_in_the_same_order(tmp_path, tiny):
    """A tiny corpus gives 3 steps per epoch; resuming mid-epoch 2 must keep the data order."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of a small corpus for resume tests.\n" for i in range(120)))
    common = tiny + ["data=text", f"data.path={corpus}", "logger=csv", "trainer.log_every_n_steps=1",
                     "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=4", "data.batch_size=8",
                     "scheduler.decay_steps=9"]
    run(common + ["trainer.max_steps=9"], tmp_path / "full")
    run(common + ["trainer.max_steps=4"], tmp_path / "part")
    run(common + ["trainer.max_steps=9", f"resume={tmp_path / 'part'}"], tmp_path / "resumed")
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_checkpoint_dir_holds_config_tokenizer_and_keeps_last_k(tmp_path, tiny):
    run(tiny + ["trainer.max_steps=8", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_k=2"], tmp_path)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000006.ckpt", "step000008.ckpt"]
    assert (tmp_path / "config.yaml").read_text().count("max_steps: 8") == 1
    assert not list(tmp_path.rglob(".*.tmp*")), "no temporary files left behind"


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path, tiny):
    from lmkit.errors import CheckpointError

    run(tiny + ["trainer.max_steps=2"], tmp_path / "r")
    good = tmp_path / "r" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint_file(truncated)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_file(evil)


def test_resumed_loader_is_resumable_and_warns_nothing(tmp_path, tiny, recwarn):
    """The train loader's position is part of the checkpoint (Lightning's stateful-loader protocol), so
    Lightning has no cause for "your dataloader is not resumable" on a mid-epoch resume."""
    common = tiny + ["scheduler.decay_steps=6"]
    run(common + ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3"], tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(ckpt)
    [loader_state] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["data_steps"] == 3 == state["lmkit"]["data_steps"]
    assert loader_state["stream_position"] == 3 * 4  # 3 steps of 4 examples
    recwarn.clear()
    resumed = run(common + ["trainer.max_steps=6", f"resume={ckpt}"], tmp_path / "resumed")
    assert resumed["steps"] == 6
    assert not [w for w in recwarn if "not resumable" in str(w.message)], [str(w.message) for w in recwarn]


def test_summary_says_steps_trained_now_and_in_total(tmp_path, tiny):
    from lmkit.train import format_summary

    first = run(tiny + ["trainer.max_steps=4"], tmp_path)
    assert (first["steps"], first["steps_trained"], first["resumed_from"]) == (4, 4, None)
    assert format_summary(first).startswith("trained 4 steps, ")
    more = run(tiny + ["trainer.max_steps=6", f"resume={tmp_path}"], tmp_path)
    assert (more["steps"], more["steps_trained"], more["resumed_from"]) == (6, 2, 4)
    assert format_summary(more).startswith("trained 2 steps (6 in total), ")
    again = run(tiny + ["trainer.max_steps=6", f"resume={tmp_path}"], tmp_path)  # already at max_steps
    assert format_summary(again).startswith("trained 0 steps (6 in total), ")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A 2-step run on a text corpus (its checkpoint holds the data fingerprint)."""
    from lmkit_test_utils import TINY

    root = tmp_path_factory.mktemp("text-run")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a corpus for data-change tests.\n" for i in range(400)))
    # a fixed embedding size: another tokenizer then still fits the model, and its data check speaks
    args = TINY + ["data=text", f"data.path={corpus}", "trainer.max_steps=2", "model.vocab_size=512"]
    run(args, root / "run")
    return root, args


DATA_CHANGES = {
    "data.seq_len": (["data.seq_len=16"], "data.seq_len is 16 here but 32 in the checkpoint"),
    "data.val_fraction": (["data.val_fraction=0.2"], "data.val_fraction is 0.2 here but 0.1 in the checkpoint"),
    "seed": (["seed=5"], "seed is 5 here but 1337 in the checkpoint"),
    "data.doc_separator": (["data.doc_separator=of"], "data.doc_separator is 'of' here but None in the checkpoint"),
    "another corpus": (["data.path={other}"], "corpus is "),
    "the corpus edited in place": (["EDIT"], "corpus is "),
    "tokenizer settings": (["tokenizer=bpe", "tokenizer.vocab_size=300"], "tokenizer is "),
}


@pytest.mark.parametrize("change", list(DATA_CHANGES))
def test_resume_on_other_data_is_refused_naming_what_differs(tmp_path, text_run, change):
    from lmkit.errors import CheckpointError

    root, args = text_run
    ckpt = tmp_path / "last.ckpt"  # outside its run: the checkpoint's own record is what is compared
    ckpt.write_bytes((root / "run" / "checkpoints" / "last.ckpt").read_bytes())
    other = tmp_path / "other.txt"
    other.write_text("".join(f"another text, line {i}, for data-change tests.\n" for i in range(400)))
    extra, expected = DATA_CHANGES[change]
    corpus = Path(next(a for a in args if a.startswith("data.path=")).split("=", 1)[1])
    if extra == ["EDIT"]:
        edited = tmp_path / "corpus.txt"
        edited.write_text(corpus.read_text().replace("line 7 ", "line 7, edited "))
        extra = [f"data.path={edited}"]
    extra = [e.format(other=other) for e in extra]
    with pytest.raises(CheckpointError, match="was trained on other data: ") as e:
        run(args + extra + ["trainer.max_steps=4", f"resume={ckpt}"], tmp_path / "refused")
    assert expected in str(e.value) and "resume_allow_data_change=true" in str(e.value)
    if change == "another corpus":
        assert f"data.path is '{other}' here but '{corpus}' in the checkpoint" in str(e.value)
    assert not (tmp_path / "refused").exists()
    allowed = run(args + extra + ["trainer.max_steps=4", f"resume={ckpt}", "resume_allow_data_change=true"],
                  tmp_path / "allowed")
    assert allowed["steps"] == 4


def test_corpus_moved_elsewhere_resumes(tmp_path, text_run):
    """The corpus is compared by its content: the same text at another path resumes."""
    root, args = text_run
    corpus = Path(next(a for a in args if a.startswith("data.path=")).split("=", 1)[1])
    moved = tmp_path / "moved.txt"
    moved.write_text(corpus.read_text())
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    state = load_checkpoint_file(ckpt)
    assert state["lmkit"]["data"]["data.path"] == [str(corpus)]
    resumed = run([a for a in args if not a.startswith("data.path=")] + [f"data.path={moved}", "trainer.max_steps=4",
                                                                        f"resume={ckpt}"], tmp_path / "moved-run")
    assert resumed["steps"] == 4


def _positions(sampler, steps) -> list[list[int]]:
    return [[pos for _, pos in sampler.keys_for_step(s)] for s in steps]


def test_sampler_resumed_with_another_layout_continues_the_stream():
    """The loader's state holds the stream position: a resume with another batch size, number of
    micro-batches or of ranks takes the examples that follow, none skipped or seen twice."""
    from lmkit.data.sampler import StepBatchSampler

    done = {"steps": 3}
    before = StepBatchSampler(1000, 4, 1, seed=0, start_step=lambda: done["steps"])
    assert _positions(before, range(3)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    state = before.state_dict()
    assert (state["data_steps"], state["stream_position"]) == (3, 12)

    bigger = StepBatchSampler(1000, 8, 1, seed=0, start_step=lambda: 3)  # data.batch_size 4 -> 8
    bigger.load_state_dict(state)
    assert _positions(bigger, [3, 4]) == [list(range(12, 20)), list(range(20, 28))]
    assert next(iter(bigger))[0] == bigger.keys_for_step(3)[0]  # the first step after the resume

    ranks = [StepBatchSampler(1000, 2, 2, seed=0, rank=r, world_size=2, start_step=lambda: 3) for r in (0, 1)]
    for r in ranks:  # 2 ranks x 2 micro-batches x 2 examples: the next 8 examples, split between the ranks
        r.load_state_dict(state)
    assert sorted(p for r in ranks for p in _positions(r, [3])[0]) == list(range(12, 20))

    same = StepBatchSampler(1000, 4, 1, seed=0, start_step=lambda: 3)  # the same layout: the uninterrupted order
    same.load_state_dict(state)
    assert same.keys_for_step(5) == before.keys_for_step(5)


def test_resume_with_another_batch_size_goes_on_from_the_stream_position(tmp_path, tiny):
    run(tiny + ["trainer.max_steps=3", "trainer.checkpoint_every_n_steps=3"], tmp_path)
    resumed = run(tiny + ["trainer.max_steps=5", "data.batch_size=8", "trainer.checkpoint_every_n_steps=1",
                          f"resume={tmp_path}"], tmp_path)
    assert resumed["steps"] == 5
    state = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    [loader_state] = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (loader_state["data_steps"], loader_state["stream_position"]) == (5, 3 * 4 + 2 * 8)
    # the other checkpoint interval still continues the run's last.ckpt and keep-last-k (no last-v1.ckpt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.ckpt", "step000004.ckpt", "step000005.ckpt"]
