"""data.val_path (a separate validation set) and data.mixture (weighted sources, per-source validation metrics)."""
from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest

from lmkit.api import build, run
from lmkit.data.mixture import MixtureLayout, round_counts
from lmkit_test_utils import TINY, one_error_line

EOS = 257  # the byte tokenizer's EOS id (ByteTokenizer().eos_id)


def _text(words: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = words.split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture
def corpora(tmp_path):
    """Two sources with disjoint alphabets, and a validation file for the second."""
    files = {
        "a": _text("the quick brown fox jumps over lazy dog", 1500, 0),
        "b": _text("alpha beta gamma delta epsilon zeta eta theta", 800, 1),
        "bval": _text("alpha beta gamma delta epsilon zeta eta theta", 300, 2),
    }
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
    return tmp_path


def _mixture(d, wa=0.7, wb=0.3) -> str:
    return (f"data.mixture=[{{source: text, path: {d / 'a.txt'}, weight: {wa}, name: a}}, "
            f"{{source: text, path: {d / 'b.txt'}, weight: {wb}, name: b, val_path: {d / 'bval.txt'}}}]")


def _packed(text: str) -> list[int]:
    return list(text.encode()) + [EOS]


# -- data.val_path ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["text", "jsonl", "hf"])
def test_val_path_is_what_validation_reads(tmp_path, tiny, kind):
    train_docs = [_text("one two three four five six", 200, i) for i in range(3)]
    val_docs = [_text("seven eight nine ten", 150, 9)]
    if kind == "text":
        (tmp_path / "train").mkdir()
        for i, d in enumerate(train_docs):
            (tmp_path / "train" / f"{i}.txt").write_text(d)
        train, val = tmp_path / "train", tmp_path / "val.txt"
        val.write_text(val_docs[0])
        extra = []
    else:
        train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
        train.write_text("".join(json.dumps({"body": d}) + "\n" for d in train_docs))
        val.write_text("".join(json.dumps({"body": d}) + "\n" for d in val_docs))
        extra = ["data.text_field=body"] + (["data.hf_builder=json"] if kind == "hf" else [])
    built = build(tiny + [f"data={kind}", f"data.path={train}", f"data.val_path={val}", "data.val_fraction=0"] + extra,
                  tmp_path / "run")
    dm = built.datamodule
    assert np.asarray(dm.splits.val).tolist() == [t for d in val_docs for t in _packed(d)]
    assert np.asarray(dm.splits.train).tolist() == [t for d in train_docs for t in _packed(d)]  # all of data.path
    n_val = len(_packed(val_docs[0]))
    assert dm.has_validation and len(dm.val_set) == (n_val - dm.block_len) // dm.block_len + 1  # blocks side by side
    fp = dm.fingerprint()
    assert fp["val_corpus"].startswith(f"{n_val} tokens") and fp["data.val_path"] == [str(val)]


def test_changed_val_file_invalidates_only_the_val_cache(corpora, tiny):
    cache = corpora / "cache"
    args = tiny + ["data=text", f"data.path={corpora / 'a.txt'}", f"data.val_path={corpora / 'bval.txt'}",
                   f"data.cache_dir={cache}"]
    build(args, corpora / "r1")
    first = {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").glob("*.npy")}
    assert len(first) == 2
    (corpora / "bval.txt").write_text(_text("alpha beta gamma", 300, 5))
    dm = build(args, corpora / "r2").datamodule
    second = {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").glob("*.npy")}
    kept = set(first) & set(second)
    assert len(second) == 3 and len(kept) == 2 and all(first[n] == second[n] for n in kept)  # train entry reused
    assert np.asarray(dm.splits.val).tolist() == _packed((corpora / "bval.txt").read_text())


# -- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, counts", [([0.7, 0.3], [7, 3]), ([5, 3, 2], [5, 3, 2]), ([1, 2.5], [2, 5]),
                                             ([1, math.pi], None)])
def test_block_shares_match_the_weights(weights, counts):
    """Every prefix of the stream holds each source within 2 blocks of weight · prefix (the interleaving's bound,
    module docstring: |n_k - share_k · P| < 1/2 + K/2 for K sources); whole rounds hold exactly c_k each."""
    n_blocks = [50, 7, 3][:len(weights)]
    layout = MixtureLayout(weights, n_blocks, seed=3)
    w = np.asarray(weights, float) / sum(weights)
    if counts is not None:
        assert layout.counts.tolist() == counts
    else:  # no round up to 10 000 is exact: shares within 1/10 000 of the weights
        assert layout.round == 10_000 and np.abs(layout.shares() - w).max() <= 1e-4
    positions = np.arange(20 * layout.round if layout.round < 1000 else 30_000)
    src = layout.sources(positions)
    prefix = np.stack([np.cumsum(src == k) for k in range(len(w))], axis=1)
    P = positions[:, None] + 1
    assert np.abs(prefix - layout.shares()[None, :] * P).max() < 0.5 + len(w) / 2
    whole = P[:, 0] % layout.round == 0
    assert (prefix[whole] == layout.counts[None, :] * P[whole] // layout.round).all()
    # each source's draws: its blocks in its own range, every block once per epoch (the small source repeats)
    items = layout.items(positions)
    for k, n in enumerate(n_blocks[:len(w)]):
        local = items[src == k] - layout.offsets[k]
        assert local.min() >= 0 and local.max() < n
        epochs = local[: (len(local) // n) * n].reshape(-1, n)
        assert (np.sort(epochs, axis=1) == np.arange(n)).all()
        assert len(epochs) < 2 or not (epochs[0] == epochs[1]).all()  # reshuffled each epoch


def test_round_counts_keeps_every_source():
    counts = round_counts([1e-9, 1.0])
    assert counts.sum() == 10_000 and counts[0] == 1


def test_training_batches_follow_the_weights_and_come_from_their_source(corpora, tiny):
    dm = build(tiny + ["data=mixture", _mixture(corpora)], corpora / "run").datamodule
    sampler = dm.train_sampler()
    texts = {0: ",".join(map(str, _packed((corpora / "a.txt").read_text()))),
             1: ",".join(map(str, _packed((corpora / "b.txt").read_text())))}
    seen = np.zeros(2, int)
    for step in range(25):  # 4 blocks a step: 100 positions = 10 rounds of 7 + 3
        for index, pos in sampler.keys_for_step(step):
            k = dm.train_set.source_of(index)
            seen[k] += 1
            block, _ = dm.train_set[(index, pos)]
            assert "," + ",".join(map(str, block.tolist())) + "," in "," + texts[k] + ","
        assert np.abs(seen - np.array([0.7, 0.3]) * seen.sum()).max() < 1.5
    assert seen.tolist() == [70, 30]


def _losses(run_dir):
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    return ({int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")},
            [r for r in rows if r.get("val/a/loss")])


def test_resume_with_a_mixture_is_exact(corpora, tiny):
    common = tiny + ["data=mixture", _mixture(corpora), "logger=csv", "trainer.log_every_n_steps=1",
                     "trainer.checkpoint_every_n_steps=3", "trainer.val_check_interval=3", "data.grad_accum=2",
                     "scheduler.decay_steps=7"]
    run(common + ["trainer.max_steps=7"], corpora / "full")
    run(common + ["trainer.max_steps=3"], corpora / "part")
    run(common + ["trainer.max_steps=7", f"resume={corpora / 'part'}"], corpora / "resumed")
    (full, full_val), (resumed, resumed_val) = _losses(corpora / "full"), _losses(corpora / "resumed")
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), f"step {step}"
    last = lambda rows, key: float(rows[-1][key])  # noqa: E731
    assert last(resumed_val, "val/b/loss") == pytest.approx(last(full_val, "val/b/loss"), rel=1e-5)


def test_changed_weights_refuse_the_resume(corpora, tiny):
    from lmkit.errors import CheckpointError

    common = tiny + ["data=mixture", "trainer.max_steps=2"]
    run(common + [_mixture(corpora)], corpora / "part")
    with pytest.raises(CheckpointError, match="data.mixture"):
        build(common + [_mixture(corpora, 0.5, 0.5), f"resume={corpora / 'part'}"], corpora / "again")


# -- per-source validation ----------------------------------------------------------------------
def test_per_source_metrics_equal_each_source_alone(corpora, tiny):
    mix = build(tiny + ["data=mixture", _mixture(corpora)], corpora / "mix")
    module, trainer = mix.module, mix.trainer
    trainer.validate(module, datamodule=mix.datamodule, verbose=False)
    mixed = module.history[-1]
    alone = {
        "a": [f"data.path={corpora / 'a.txt'}"],
        "b": [f"data.path={corpora / 'b.txt'}", f"data.val_path={corpora / 'bval.txt'}"],
    }
    totals = []
    for name, args in alone.items():
        dm = build(tiny + ["data=text"] + args, corpora / f"alone_{name}").datamodule
        trainer.validate(module, datamodule=dm, verbose=False)  # the same weights on this source's batches only
        ref = module.history[-1]
        for metric in ("loss", "ppl", "bpb"):
            assert mixed[f"val/{name}/{metric}"] == pytest.approx(ref[f"val/{metric}"], rel=1e-5), (name, metric)
        totals.append((ref["val/loss"], min(len(dm.val_set) // 4, 2) * 4 * 32))  # (loss, targets)
    overall = sum(loss * n for loss, n in totals) / sum(n for _, n in totals)  # the mean over all val targets
    assert mixed["val/loss"] == pytest.approx(overall, rel=1e-5)


# -- bad input ------------------------------------------------------------------------------------
def _bad(d):
    a, b = d / "a.txt", d / "b.txt"
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01 not text")
    text = ["data=text", f"data.path={a}"]
    mix = ["data=mixture"]
    return [
        (mix + [f"data.mixture=[{{source: text, path: {a}, weight: 0}}]"], "data.mixture[0] has weight=0"),
        (mix + [f"data.mixture=[{{source: text, path: {a}, weight: heavy}}]"], "weight='heavy'"),
        (mix + [f"data.mixture=[{{source: text, path: {a}}}]"], "data.mixture[0] has no weight"),
        (mix + ["data.mixture=[]"], "data.mixture is empty"),
        (mix + [f"data.mixture=[{{source: jsonl, path: {a}, weight: 1, text_feild: body}}]"],
         "unknown key 'text_feild'. Did you mean 'text_field'?"),
        (mix + [f"data.mixture=[{{source: text, path: {a}, weight: 1, name: x}}, "
                f"{{source: text, path: {b}, weight: 1, name: x}}]"], "data.mixture[1].name='x' is also the name"),
        (mix + [f"data.path={a}", f"data.mixture=[{{source: text, path: {b}, weight: 1}}]"],
         "data.mixture and data.path="),
        (mix + [f"data.mixture=[{{source: text, path: {a}, weight: 1}}, {{source: text, path: {d / 'no.txt'}, "
                f"weight: 1}}]"], "does not exist. Check data.mixture[1].path"),
        (mix + [f"data.mixture=[{{source: txt, path: {a}, weight: 1}}]"], "data.mixture[0].source:"),
        (mix + [f"data.mixture=[{{source: text, weight: 1}}]"], "data.mixture[0] (text0) has no path"),
        (mix, "data.source=mixture needs data.mixture="),
        (text + [f"data.val_path={d / 'no.txt'}"], "does not exist. Check data.val_path"),
        (text + [f"data.val_path={d / 'empty.txt'}"], "corpus is empty: no document contains any text. Check "
                                                       "data.source / data.val_path"),
        (text + [f"data.val_path={d / 'binary.txt'}"], "binary file (it contains NUL bytes), not text. Point "
                                                        "data.val_path"),
        (["data=tinyshakespeare", f"data.val_path={b}"], "data.val_path is set, but data.source=tinyshakespeare"),
    ]


def test_bad_input_gives_one_line(corpora, capsys):
    for argv, expected in _bad(corpora):
        one_error_line(capsys, TINY + argv, expected)


def test_val_path_warns_when_val_fraction_is_set(corpora, tiny, capsys):
    build(tiny + ["data=text", f"data.path={corpora / 'a.txt'}", f"data.val_path={corpora / 'bval.txt'}",
                  "data.val_fraction=0.3"], corpora / "run")
    err = capsys.readouterr().err
    assert err.count("data.val_fraction=0.3 is ignored: data.val_path is set") == 1
