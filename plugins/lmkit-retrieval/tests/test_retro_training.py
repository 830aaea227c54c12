"""``retro_lm``: RETRO trained with neighbours from a datastore (issue 18)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lmkit_retrieval import Datastore, build_store
from retrieval_helpers import CHUNK, encoder, encoder_run, one_error_line  # noqa: F401

TEXT_CHARS = 12_000  # ~140 speeches; a few hundred training chunks of 16 bytes
RUN = ["model=retro_tiny", "+objective=retro_lm", "model.n_layer=2", "model.cca_layers=[1]", "model.d_model=32",
       "model.n_head=2", "model.enc_d_model=32", "model.enc_n_head=2", "model.max_seq_len=64", "data.seq_len=64",
       "data.batch_size=4", "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.val_batches=2",
       "trainer.progress_bar=false", "logger=none", "callbacks=[]", "scheduler.warmup_steps=1", "optimizer.lr=3e-3",
       "data.source=text"]


@pytest.fixture(scope="module")
def corpus(encoder, tmp_path_factory):  # noqa: F811
    """(data overrides, train tokens, store path): a small text corpus of speeches and a store of its train split."""
    from lmkit.data.sources import BUILTIN_CORPORA
    from lmkit_retrieval.command import corpus_stream

    root = tmp_path_factory.mktemp("retro-train")
    text = BUILTIN_CORPORA["tinyshakespeare"].read_text(encoding="utf-8")[:TEXT_CHARS]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    data = ["data.source=text", f"data.path={root / 'corpus.txt'}", 'data.doc_separator="\n\n"',
            f"data.cache_dir={root / 'cache'}"]
    tokens, description = corpus_stream(encoder.tokenizer, data, "train")
    tokens = np.asarray(tokens, dtype=np.int64)
    build_store(root / "store", tokens, encoder, chunk_len=CHUNK, data=description)
    return data, tokens, root / "store"


def _argv(corpus, *extra):
    data, _, store = corpus
    return RUN + data[1:] + [f"objective.store={store}", *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    import lmkit.api

    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("retro-run")
    return {**lmkit.api.run(_argv(corpus), run_dir), "run_dir": run_dir}


def _datamodule(corpus, tmp_path, *extra):
    """The retro_lm data module of the test run, prepared (as training prepares it)."""
    import lmkit.api

    built = lmkit.api.build(_argv(corpus, *extra), tmp_path)
    dm = built.datamodule
    dm.prepare()
    return dm


def _brute_force(store, encoder, chunk, doc_range, k):  # noqa: F811
    """Cosine top-k over every store embedding, centered on their mean (the store's default keys), skipping chunks
    whose value overlaps ``doc_range``."""
    e = np.asarray(store.embeddings, dtype=np.float64)
    mean = e.mean(0)
    q = encoder.embed(chunk[None])[0] - mean
    e = e - mean
    cos = e @ q / (np.linalg.norm(e, axis=1) * np.linalg.norm(q))
    docs = store.docs
    cos[(docs[:, 0] <= doc_range[1]) & (docs[:, 1] >= doc_range[0])] = -np.inf
    return np.argsort(-cos, kind="stable")[:k]


def _check_against_brute_force(dm, items, split_tokens, offset, stream, encoder, store):  # noqa: F811
    """The collated neighbours of ``items`` (keyed blocks of one split starting at ``offset`` of ``stream``) are the
    brute-force top-k of each chunk without its own document(s); returns the number of chunks checked."""
    from lmkit_retrieval.store import document_ids

    doc = document_ids(stream, encoder.tokenizer.eos_id)
    batch = dm.collate(items)["micro_batches"][0]
    B, l, k, r = batch["neighbours"].shape
    assert (B, l, k, r) == (len(items), 64 // CHUNK, 2, 2 * CHUNK)
    checked = 0
    for row, ((_, (_, index)), _) in enumerate(items):
        start = index * (dm.stride if items[0][0][1][0] == "train" else dm.val_set.blocks.stride)
        assert torch.equal(batch["input_ids"][row], torch.from_numpy(split_tokens[start:start + 64]))
        for u in range(l):
            s = offset + start + u * CHUNK
            rng = (doc[s], doc[s + CHUNK - 1])
            want = _brute_force(store, encoder, stream[s:s + CHUNK], rng, k)
            assert np.array_equal(batch["neighbours"][row, u].numpy(), store.neighbours(want)), (row, u)
            # the leakage rule: no neighbour token comes from the chunk's own document(s)
            assert not ((store.docs[want, 0] <= rng[1]) & (store.docs[want, 1] >= rng[0])).any()
            real = store.neighbours(want) != store.manifest["pad_id"]
            assert torch.equal(batch["neighbour_mask"][row, u], torch.from_numpy(real))
            checked += 1
    return checked


def test_collated_neighbours_equal_brute_force_search_without_own_document(corpus, encoder, tmp_path):  # noqa: F811
    _, tokens, store_path = corpus
    store = Datastore.open(store_path)
    dm = _datamodule(corpus, tmp_path)
    train = np.asarray(dm.splits.train, dtype=np.int64)
    val = np.asarray(dm.splits.val, dtype=np.int64)
    assert np.array_equal(train, tokens)
    stream = np.concatenate([train, val])
    items = [dm.train_set[(i, i)] for i in (0, 3, len(dm.train_set) - 1)]
    assert _check_against_brute_force(dm, items, train, 0, stream, encoder, store) == 3 * 4
    # validation blocks (stride seq_len + 1: not on the stream's chunk grid), documents numbered after train's
    items = [dm.val_set[(i, i)] for i in (0, len(dm.val_set) - 1)]
    assert items[0][0][1][0] == "val"
    assert _check_against_brute_force(dm, items, val, len(train), stream, encoder, store) == 2 * 4
    # DataLoader workers get a pickled copy (the memory maps are reopened there): same batch
    copy = pickle.loads(pickle.dumps(dm.collate))
    a, b = dm.collate(items)["micro_batches"][0], copy(items)["micro_batches"][0]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_no_chunk_of_any_block_gets_its_own_document(corpus, encoder, tmp_path):  # noqa: F811
    from lmkit_retrieval.store import document_ids

    _, tokens, store_path = corpus
    store = Datastore.open(store_path)
    dm = _datamodule(corpus, tmp_path)
    table = np.load(dm.collate.collator.tables["train"])
    starts = np.arange(len(dm.train_set))[:, None] * dm.stride + np.arange(64 // CHUNK)[None] * CHUNK
    doc = document_ids(tokens, encoder.tokenizer.eos_id)
    lo, hi = doc[starts][..., None], doc[starts + CHUNK - 1][..., None]
    span = store.docs[table]
    assert (table >= 0).all()
    assert not ((span[..., 0] <= hi) & (span[..., 1] >= lo)).any()


def test_a_store_holding_the_validation_text_leaks_only_without_the_validation_rule(corpus, encoder, tmp_path):  # noqa: F811
    """RETRO's leakage analysis: with a store of the whole corpus, validation chunks find their own document
    unless the rule applies to validation too (objective.val_exclude_same_document, null = training's rule)."""
    from lmkit_retrieval.command import corpus_stream
    from lmkit_retrieval.store import document_ids

    data, tokens, _ = corpus
    stream, _ = corpus_stream(encoder.tokenizer, data, "all")
    stream = np.asarray(stream, dtype=np.int64)
    build_store(tmp_path / "all", stream, encoder, chunk_len=CHUNK)
    leaky = (corpus[0], corpus[1], tmp_path / "all")

    def own_document_share(dm, split):
        table = np.load(dm.collate.collator.tables[split])
        n, l, _ = table.shape
        offset = 0 if split == "train" else len(dm.splits.train)
        stride = dm.stride if split == "train" else dm.val_set.blocks.stride
        starts = offset + np.arange(n)[:, None] * stride + np.arange(l)[None] * CHUNK
        doc = document_ids(stream, encoder.tokenizer.eos_id)
        lo, hi = doc[starts][..., None], doc[starts + CHUNK - 1][..., None]
        span = Datastore.open(tmp_path / "all").docs[table]
        return ((span[..., 0] <= hi) & (span[..., 1] >= lo)).any(-1).mean()

    ruled = _datamodule(leaky, tmp_path / "ruled")
    assert own_document_share(ruled, "train") == 0 and own_document_share(ruled, "val") == 0
    open_val = _datamodule(leaky, tmp_path / "open", "objective.val_exclude_same_document=false")
    assert own_document_share(open_val, "train") == 0  # training keeps its rule
    # 49% with the test's small encoder (chunks off the store's grid): about half find their own speech
    assert own_document_share(open_val, "val") > 0.3


def test_training_lowers_the_loss(trained):
    start, end = trained["start"], trained["end"]
    assert end["val/loss"] < start["val/loss"] - 1.0, (start, end)
    assert end["val/bpb"] < start["val/bpb"]


def test_resume_is_exact(corpus, tmp_path):
    """Interrupted at step 3 and resumed (2 loader workers, gradient accumulation 2): the same losses, step for step,
    as the uninterrupted run (the neighbours are a function of the block's index)."""
    import lmkit.api
    from lmkit_test_utils import step_losses

    common = _argv(corpus, "logger=csv", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3",
                   "trainer.val_check_interval=3", "data.grad_accum=2", "data.num_workers=2",
                   "scheduler.decay_steps=8")
    lmkit.api.run(common + ["trainer.max_steps=8"], tmp_path / "full")
    lmkit.api.run(common + ["trainer.max_steps=3"], tmp_path / "part")
    lmkit.api.run(common + ["trainer.max_steps=8", f"resume={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
                  tmp_path / "resumed")
    full, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5, 6, 7]
    assert [resumed[s] for s in sorted(resumed)] == [full[s] for s in sorted(resumed)]
    assert full[7] != full[3]


def test_bad_input_is_one_line(corpus, encoder, capsys, tmp_path):  # noqa: F811
    data, tokens, store = corpus
    base = [a for a in _argv(corpus) if not a.startswith("objective.store=")] + [f"hydra.run.dir={tmp_path / 'r'}"]
    one_error_line(capsys, ["train", *base], "objective.store is required")
    one_error_line(capsys, ["train", *base, f"objective.store={tmp_path / 'nope'}"], "does not exist")
    one_error_line(capsys, ["train", *base, f"objective.store={store}", "objective.k=100000",
                            "model.n_neighbours=100000"], "larger than the retrieval store")
    one_error_line(capsys, ["train", *base, f"objective.store={store}", "data.seq_len=60"],
                   "data.seq_len=60 must be a multiple of the store's chunk_len=16")
    one_error_line(capsys, ["train", *[a for a in base if not a.startswith("model.")], "model=gpt_tiny",
                            f"objective.store={store}"], "needs an architecture that accepts neighbours")
    shifted = build_store(tmp_path / "shifted", tokens[CHUNK * 3 + 5:CHUNK * 20], encoder, chunk_len=CHUNK)
    one_error_line(capsys, ["train", *base, f"objective.store={shifted.path}"], "holds other text")
    other = build_store(tmp_path / "other", tokens[:CHUNK * 8], _OtherTokenizerEncoder(encoder), chunk_len=CHUNK)
    one_error_line(capsys, ["train", *base, f"objective.store={other.path}"], "another tokenizer")


def _retro_reference_nll(model, store, encoder, stream, seq_len, stride, k, docs=None):  # noqa: F811
    """Summed NLL of ``stream``'s sliding windows, one window and one chunk at a time: each complete chunk of the
    window's context gets the store's top-k to its own embedding (chunk + continuation), given to the model;
    ``docs`` (the document of each stream position): no neighbour overlapping the chunk's documents.
    Returns (NLL, the neighbours [l, k, 2m] of each window)."""
    from lmkit.evaluation.corpus import sliding_windows

    m, total, given = store.chunk_len, 0.0, []
    for _, first, end in sliding_windows(len(stream), seq_len, stride):
        c = min(end - 1, seq_len)
        ctx = stream[end - 1 - c:end - 1]
        l = -(-c // m)
        neighbours = np.zeros((1, l, k, 2 * m), dtype=np.int64)
        mask = np.zeros((1, l, k, 2 * m), dtype=bool)
        for u in range(c // m):  # complete chunks only
            at = end - 1 - c + u * m
            exclude = None if docs is None else [[docs[at], docs[at + m - 1]]]
            ids, _ = store.search(encoder.embed(ctx[None, u * m:(u + 1) * m]), k, exclude)
            neighbours[0, u] = store.neighbours(ids[0])
            mask[0, u] = (neighbours[0, u] != store.manifest["pad_id"]) & (ids[0] >= 0)[:, None]
        given.append(np.where(mask[0], neighbours[0], -1))
        with torch.no_grad():
            hidden = model(torch.from_numpy(ctx[None].astype(np.int64)), neighbours=torch.from_numpy(neighbours),
                           neighbour_mask=torch.from_numpy(mask))
            logp = torch.log_softmax(model.logits(hidden[0]).float(), -1)
        n = end - first
        positions = torch.arange(c - n, c)
        total -= float(logp[positions, torch.from_numpy(stream[first:end].astype(np.int64))].sum())
    return total, given


def _recording_neighbours(monkeypatch):
    """Record the neighbours (masked entries as -1) that ``retrieval evaluate`` gives each window, in order."""
    from lmkit_retrieval.ralm import ChunkNeighbours

    given, original = [], ChunkNeighbours.model_inputs

    def record(self, ids, starts, lengths):
        out = original(self, ids, starts, lengths)
        given.extend(np.where(out["neighbour_mask"], out["neighbours"], -1))
        return out

    monkeypatch.setattr(ChunkNeighbours, "model_inputs", record)
    return given


def _same_neighbours(given, expected):
    assert len(given) == len(expected)
    for got, want in zip(given, expected):  # a batch's rows have the longest row's chunks: the rest are empty
        assert np.array_equal(got[:len(want)], want) and (got[len(want):] == -1).all()


def test_retrieval_evaluate_gives_a_retro_model_each_chunks_neighbours(trained, corpus, encoder,  # noqa: F811
                                                                       monkeypatch):
    """``retrieval evaluate`` on a RETRO run scores it through chunked cross-attention: the same windows as
    without retrieval, each complete chunk given the store's neighbours (equal to a window-by-window loop)."""
    from lmkit.evaluation.run import EvalOptions, corpus_tokens, load_model
    from lmkit_retrieval.ralm import evaluate, format_results

    _, _, store_path = corpus
    run_dir = trained["run_dir"]
    given = _recording_neighbours(monkeypatch)
    out = evaluate(run_dir, {"store": str(store_path), "stride": 24, "max_tokens": 300, "device": "cpu"}, [])
    assert out["method"].startswith("RETRO") and out["k"] == 2 and out["query_len"] is None
    assert "neighbours of each chunk (CCA)" in format_results(out)
    loaded = load_model(run_dir)
    tokens, _ = corpus_tokens(loaded, [], EvalOptions(max_tokens=300).check())
    stream = np.concatenate([[loaded.tokenizer.eos_id], np.asarray(tokens, dtype=np.int64)])
    store = Datastore.open(store_path)
    ref, expected = _retro_reference_nll(loaded.model, store, store.load_encoder(), stream, 64, 24, 2)
    _same_neighbours(given, expected)
    got = out["with_retrieval"]
    assert got["loss"] * got["tokens"] == pytest.approx(ref, rel=1e-5)
    assert abs(got["loss"] - out["without_retrieval"]["loss"]) > 1e-5  # the neighbours changed the predictions
    # k=0: no retrieval, both rows equal; method=ralm: the same model with neighbours in its context instead
    none = evaluate(run_dir, {"store": str(store_path), "stride": 24, "max_tokens": 300, "k": 0}, [])
    assert none["with_retrieval"]["loss"] == none["without_retrieval"]["loss"] == out["without_retrieval"]["loss"]
    ralm = evaluate(run_dir, {"store": str(store_path), "stride": 4, "max_tokens": 100, "method": "ralm",
                              "seq_len": 64, "query_len": 16}, [])
    assert ralm["method"].startswith("In-Context RALM") and ralm["k"] == 1
    # lmkit's own evaluate scores the plain decoder (the "without" row) and says so
    from lmkit.evaluation.run import evaluate as lmkit_evaluate, format_results as lmkit_format

    plain = lmkit_evaluate(run_dir, EvalOptions(max_tokens=300, stride=24, seq_len=64))["corpus"]
    assert plain["loss"] == pytest.approx(out["without_retrieval"]["loss"], rel=1e-5)
    printed = lmkit_format({"model": str(run_dir), "architecture": "retro", "corpus": plain})
    assert "retrieval evaluate" in plain["note"] and "note: scored without retrieved neighbours" in printed
    # the store holds the training split: scored with its own documents excluded, as the loop excludes them
    from lmkit_retrieval.store import document_ids

    given.clear()
    ruled = evaluate(run_dir, {"store": str(store_path), "stride": 24, "max_tokens": 300, "split": "train",
                               "exclude_same_document": True}, [])
    train, _ = corpus_tokens(loaded, [], EvalOptions(split="train", max_tokens=300).check())
    stream = np.concatenate([[loaded.tokenizer.eos_id], np.asarray(train, dtype=np.int64)])
    docs = document_ids(np.asarray(train), loaded.tokenizer.eos_id)
    ref, expected = _retro_reference_nll(loaded.model, store, store.load_encoder(), stream, 64, 24, 2,
                                         np.concatenate([docs[:1], docs]))
    _same_neighbours(given, expected)
    got = ruled["with_retrieval"]
    assert ruled["exclude_same_document"] and got["loss"] * got["tokens"] == pytest.approx(ref, rel=1e-5)
    assert docs.max() >= 3  # the scored text spans several speeches
    _, unruled = _retro_reference_nll(loaded.model, store, store.load_encoder(), stream, 64, 24, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(expected, unruled))  # the rule removed some neighbours


def test_retrieval_evaluate_refuses_mismatched_retro_settings(trained, corpus, encoder, capsys,  # noqa: F811
                                                              tmp_path):
    _, tokens, store_path = corpus
    run_dir = str(trained["run_dir"])
    evaluate = ["retrieval", "evaluate", run_dir, f"store={store_path}", "max_tokens=200"]
    one_error_line(capsys, [*evaluate, "k=1"], "n_neighbours=2")
    one_error_line(capsys, [*evaluate, "method=retor"], "Did you mean 'retro'")
    wide = build_store(tmp_path / "wide", tokens[:CHUNK * 40], encoder, chunk_len=2 * CHUNK)
    one_error_line(capsys, ["retrieval", "evaluate", run_dir, f"store={wide.path}"], "store's chunk_len=32")


class _OtherTokenizerEncoder:
    """The test encoder under another tokenizer (a byte tokenizer with a different fingerprint)."""

    def __init__(self, encoder):  # noqa: F811
        self._e = encoder
        self.tokenizer = _Renamed(encoder.tokenizer)
        self.path, self.fingerprint = encoder.path, encoder.fingerprint

    def __getattr__(self, name):
        return getattr(self._e, name)


class _Renamed:
    def __init__(self, tok):
        self._t = tok

    def fingerprint(self):
        return "another-" + self._t.fingerprint()

    def __getattr__(self, name):
        return getattr(self._t, name)
