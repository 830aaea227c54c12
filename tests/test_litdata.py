"""data=litdata: token stores written by ``python -m lmkit optimize`` and streamed by litdata's loader."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

litdata = pytest.importorskip("litdata")

from lmkit.api import build, run  # noqa: E402
from lmkit.commands.optimize import optimize  # noqa: E402
from lmkit.data.cache import load_tokens  # noqa: E402
from lmkit.data.sources import TextSource  # noqa: E402
from lmkit.tokenizers.byte import ByteTokenizer  # noqa: E402
from lmkit_test_utils import TINY, one_error_line, step_losses  # noqa: E402

CHUNK = 4096  # tokens per shard: the corpus below makes about 15 training shards


def _corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()
    path.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        (path / f"doc{d:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)) + "\n")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("litdata")
    corpus = _corpus(root / "corpus")
    cache = root / "cache"
    meta = optimize(str(root / "store"), ["data=text", f"data.path={corpus}", f"data.cache_dir={cache}"],
                    chunk_tokens=CHUNK, workers=2)
    return {"root": root, "corpus": corpus, "cache": cache, "path": root / "store", "meta": meta}


def _train_args(store, *extra) -> list[str]:
    return TINY + ["data=litdata", f"data.path={store['path']}", f"data.cache_dir={store['cache']}", *extra]


def _chunks_tokens(split_dir: Path) -> np.ndarray:
    """Every token of a split, chunk after chunk in the order of its index.json."""
    index = json.loads((split_dir / "index.json").read_text())
    ds = litdata.StreamingDataset(str(split_dir), item_loader=litdata.TokensLoader(block_size=1), shuffle=False)
    assert index["chunks"], index
    return np.array([int(ds[i][0]) for i in range(len(ds))])


# -- the store ----------------------------------------------------------------------------
def test_store_holds_the_token_stream_split_like_a_run(store):
    """train/ + val/ are the packed tokens of the corpus, split at the last data.val_fraction, in order."""
    tokens = np.asarray(load_tokens(TextSource(str(store["corpus"])), ByteTokenizer(), store["cache"]))
    cut = len(tokens) - int(len(tokens) * 0.1)
    train = _chunks_tokens(store["path"] / "train")
    val = _chunks_tokens(store["path"] / "val")
    assert np.array_equal(np.sort(train), np.sort(tokens[:cut]))  # every token once (chunks may come in worker order)
    index = json.loads((store["path"] / "train" / "index.json").read_text())
    assert all(c["dim"] <= CHUNK for c in index["chunks"]) and len(index["chunks"]) >= 10
    # each chunk is a contiguous piece of the stream
    pos = 0
    for c in sorted(index["chunks"], key=lambda c: tuple(int(x) for x in c["filename"][6:-4].split("-"))):
        piece = train[pos:pos + c["dim"]]
        starts = [s for s in range(0, cut, CHUNK) if np.array_equal(tokens[s:s + len(piece)], piece)]
        assert starts, c["filename"]
        pos += c["dim"]
    assert np.array_equal(val, tokens[cut:])
    meta = json.loads((store["path"] / "lmkit.json").read_text())
    assert meta["tokens"] == {"train": cut, "val": len(tokens) - cut}
    assert meta["tokenizer"]["name"] == "byte" and meta["dtype"] == "uint16"
    assert oct(store["path"].stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_split_tokens_reads_the_chunks_as_litdata_does(store):
    from lmkit.data.litdata_store import LitdataStore

    opened = LitdataStore(str(store["path"]))
    for split in ("train", "val"):
        assert np.array_equal(opened.split_tokens(split), _chunks_tokens(store["path"] / split)), split
    assert len(opened.split_tokens("all")) == sum(opened.meta["tokens"].values())


def test_evaluate_scores_the_stores_validation_split(store, tmp_path, capsys):
    """python -m lmkit evaluate on a data=litdata run reads the store's val/ split, like data=text's."""
    import lmkit.cli

    run(_train_args(store, "trainer.max_steps=2"), tmp_path / "lit")
    run(TINY + ["data=text", f"data.path={store['corpus']}", f"data.cache_dir={store['cache']}",
                "trainer.max_steps=2"], tmp_path / "txt")
    results = []
    for name in ("lit", "txt"):
        out = tmp_path / f"{name}.json"
        assert lmkit.cli.main(["evaluate", str(tmp_path / name), f"eval.output={out}"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["corpus"]["split"] == "val" and results[0]["corpus"]["tokens"] == results[1]["corpus"]["tokens"]


def test_optimize_is_byte_identical_and_refuses_to_overwrite(store, tmp_path):
    again = tmp_path / "again"
    optimize(str(again), ["data=text", f"data.path={store['corpus']}", f"data.cache_dir={store['cache']}"],
             chunk_tokens=CHUNK, workers=2)
    for split in ("train", "val"):
        for f in sorted((store["path"] / split).glob("chunk-*.bin")):
            assert (again / split / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(Exception, match="already exists.*--force"):
        optimize(str(again), ["data=text", f"data.path={store['corpus']}"], chunk_tokens=CHUNK)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not an lmkit store"):
        optimize(str(tmp_path / "other"), ["data=text", f"data.path={store['corpus']}"], chunk_tokens=CHUNK, force=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_ranks_read_disjoint_blocks_covering_the_split(store, monkeypatch):
    """litdata's distribution (rank from WORLD_SIZE/GLOBAL_RANK when torch.distributed is not up)."""
    from lmkit.data.litdata_module import _import_litdata

    KeyedTokens, _, TokensLoader, _ = _import_litdata()
    n_blocks = sum(c["dim"] // 33 for c in json.loads((store["path"] / "train" / "index.json").read_text())["chunks"])
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        ds = KeyedTokens(str(store["path"] / "train"), item_loader=TokensLoader(block_size=33), shuffle=True, seed=0,
                         drop_last=True, n_blocks=n_blocks)
        seen.append([key for _, key in ds])
    a, b = set(seen[0]), set(seen[1])
    assert not a & b
    assert len(a) == len(seen[0]) and len(b) == len(seen[1])
    assert len(a | b) >= n_blocks - 2 * 15  # drop_last evens the ranks out: a block or so per chunk at most


def test_parts_written_on_several_machines_merge_into_one_store(store, tmp_path, capsys):
    """--part R/N tokenizes the R-th share of the files; --merge joins the parts in rank order."""
    import lmkit.cli

    data = ["data=text", f"data.path={store['corpus']}", f"data.cache_dir={store['cache']}"]
    for rank in (1, 0):
        optimize(str(tmp_path / f"p{rank}"), data, chunk_tokens=CHUNK, workers=1, part=(rank, 2))
    parts = [str(tmp_path / "p0"), str(tmp_path / "p1")]
    assert lmkit.cli.main(["optimize", str(tmp_path / "merged"), "--merge", parts[1], parts[0]]) == 0
    assert "data=litdata data.path=" in capsys.readouterr().out
    files = sorted(store["corpus"].iterdir())
    expected = []
    for share in (files[:30], files[30:]):  # each part: its files' stream, less its own validation tail
        tokens = np.asarray(load_tokens(TextSource([str(f) for f in share]), ByteTokenizer(), store["cache"]))
        expected.append(tokens[:len(tokens) - int(len(tokens) * 0.1)])
    assert np.array_equal(_chunks_tokens(tmp_path / "merged" / "train"), np.concatenate(expected))
    meta = json.loads((tmp_path / "merged" / "lmkit.json").read_text())
    assert meta["tokens"]["train"] == sum(len(e) for e in expected) and meta["merged_parts"] == 2
    built = build(TINY + ["data=litdata", f"data.path={tmp_path / 'merged'}"], tmp_path / "run")
    index = json.loads((tmp_path / "merged" / "train" / "index.json").read_text())
    assert built.datamodule.n_train == sum(c["dim"] // 33 for c in index["chunks"]) > 0
    # refused: a repeated part, a whole store, a share larger than the files, too few parts named
    one_error_line(capsys, ["optimize", str(tmp_path / "m2"), "--merge", parts[0], parts[0]],
                   "needs the 2 parts of the corpus, ranks 0..1, each once; got ranks [0, 0]")
    one_error_line(capsys, ["optimize", str(tmp_path / "m2"), "--merge", parts[0], str(store["path"])],
                   "is a whole store, not a part")
    one_error_line(capsys, ["optimize", str(tmp_path / "m2"), "--merge", parts[0]], "at least two")
    one_error_line(capsys, ["optimize", str(tmp_path / "m2"), "--part", "2/2"], "--part takes R/N with 0 <= R < N")
    one_error_line(capsys, ["optimize", str(tmp_path / "m2"), "--part", "0/2"], "has 1 file: use at most that many")
    assert not (tmp_path / "m2").exists()


# -- training -----------------------------------------------------------------------------
def test_validation_equals_the_text_source_on_the_same_corpus(store, tmp_path):
    """Validation reads the store's val/ blocks in the order data=text reads its split: same model, same loss."""
    common = ["trainer.max_steps=1", "trainer.validate_at_start=true"]
    a = run(_train_args(store, *common), tmp_path / "litdata")
    b = run(TINY + ["data=text", f"data.path={store['corpus']}", f"data.cache_dir={store['cache']}", *common],
            tmp_path / "text")
    assert a["start"]["val/loss"] == pytest.approx(b["start"]["val/loss"], rel=1e-6)


def test_noise_keys_follow_the_block_and_the_epoch(store):
    """Each block carries (epoch - 1) * n_blocks + its index: the objective's noise differs between epochs."""
    built = build(_train_args(store, "+objective=mlm", "model=bert_tiny", "model.max_seq_len=64"), store["root"] / "b")
    dm = built.datamodule
    loader = dm.train_dataloader()
    ds = loader.dataset
    first = [key for _, key in ds]
    ds.set_epoch(2)
    second = [key for _, key in ds]
    assert sorted(k - dm.n_train for k in second) == sorted(first)
    assert max(first) < dm.n_train


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(store, tmp_path, workers):
    common = _train_args(store, "logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3",
                         "trainer.val_check_interval=3", "data.batch_size=8", "data.grad_accum=2",
                         "scheduler.decay_steps=8", f"data.num_workers={workers}")
    run(common + ["trainer.max_steps=8"], tmp_path / "full")
    run(common + ["trainer.max_steps=3"], tmp_path / "part")
    run(common + ["trainer.max_steps=8", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
        tmp_path / "resumed")
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5, 6, 7]
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_resume_on_two_ranks_is_exact(store, tmp_path):
    """torchrun, 2 CPU ranks (DDP): the resumed run's losses equal the uninterrupted run's, step for step."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    common = _train_args(store, "strategy=ddp", "logger=csv", "trainer.log_every_n_steps=1",
                         "trainer.checkpoint_every_n_steps=3", "trainer.val_check_interval=3", "data.batch_size=8",
                         "scheduler.decay_steps=8")
    for name, extra in (("full", ["trainer.max_steps=8"]), ("part", ["trainer.max_steps=3"]),
                        ("resumed", ["trainer.max_steps=8", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}",
                                     "fork=true"])):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                              str(_free_port()), "-m", "lmkit", *common, *extra, f"hydra.run.dir={tmp_path / name}"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4, 5, 6, 7]
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]
    assert a[3] != step_losses(tmp_path / "part").get(2)  # the runs trained (losses move)


# -- bad input: one line each, nothing overwritten ---------------------------------------------
def test_a_store_written_by_another_tokenizer_is_refused(store, capsys):
    one_error_line(capsys, _train_args(store, "tokenizer=bpe", "tokenizer.vocab_size=300"),
                   "was written with tokenizer=byte, but this run asks for tokenizer=bpe tokenizer.vocab_size=300")


def test_a_tampered_tokenizer_file_is_refused(store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store["path"], copy)
    (copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    one_error_line(capsys, TINY + ["data=litdata", f"data.path={copy}"], "does not match its lmkit.json")


@pytest.mark.parametrize("damage,expected", [
    ("missing", "is missing the shard train/chunk-0-1.bin"),
    ("truncated", "shard train/chunk-0-1.bin of litdata store"),
    ("index", "train/index.json is missing"),
    ("meta", "is not an lmkit litdata store: it has no lmkit.json"),
])
def test_damaged_stores_are_refused_in_one_line(store, tmp_path, capsys, damage, expected):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store["path"], copy)
    shard = copy / "train" / "chunk-0-1.bin"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "index":
        (copy / "train" / "index.json").unlink()
    else:
        (copy / "lmkit.json").unlink()
    one_error_line(capsys, TINY + ["data=litdata", f"data.path={copy}", "hydra.run.dir=" + str(tmp_path / "run")],
                   expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,expected", [
    (["data.seq_len_schedule=[{until_step: 2, seq_len: 16}]"], "data.seq_len_schedule cannot be combined with data=litdata"),
    (["data.batch_ramp_steps=2", "data.grad_accum=2"], "data.batch_ramp_steps cannot be combined with data=litdata"),
    (["data.val_path=somewhere.txt"], "data.val_path cannot be combined with data=litdata"),
    (["+objective=sft"], "data=litdata streams packed token blocks; objective 'sft'"),
    (["data.val_seq_lens=[16]"], "data.val_seq_lens cannot be combined with data=litdata"),
])
def test_settings_litdata_cannot_serve_are_refused(store, capsys, extra, expected):
    one_error_line(capsys, _train_args(store, *extra), expected)


def test_missing_store_and_optimize_of_a_store_are_refused(store, tmp_path, capsys):
    one_error_line(capsys, TINY + ["data=litdata", f"data.path={tmp_path / 'nope'}"], "does not exist")
    one_error_line(capsys, ["optimize", str(tmp_path / "x"), "data=litdata", f"data.path={store['path']}"],
                   "optimize reads a text corpus")
    one_error_line(capsys, ["optimize", str(tmp_path / "x"), "--workers", "0"], "--workers takes a whole number >= 1")
    one_error_line(capsys, ["optimize"], "optimize takes one output directory")
    assert not (tmp_path / "x").exists()


def test_optimize_prints_how_to_train_on_the_store(store, tmp_path, capsys):
    import lmkit.cli

    out = tmp_path / "cli_store"
    assert lmkit.cli.main(["optimize", str(out), "data=text", f"data.path={store['corpus']}",
                           f"data.cache_dir={store['cache']}", "data.val_fraction=0.2", "--chunk-tokens", "8192"]) == 0
    printed = capsys.readouterr().out
    assert f"data=litdata data.path={out}" in printed
    meta = json.loads((out / "lmkit.json").read_text())
    assert meta["val_fraction"] == 0.2 and meta["chunk_tokens"] == 8192
    assert torch.tensor(meta["tokens"]["val"]) > 0
