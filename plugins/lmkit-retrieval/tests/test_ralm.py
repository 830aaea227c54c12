"""In-Context RALM (``python -m lmkit retrieval evaluate``): the rows it builds, the retrieval it does, that it
reduces to lmkit's sliding-window evaluation without neighbours, that a leaky store helps a model that copies,
and the one-line errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from retrieval_helpers import CHUNK, encoder, encoder_run, one_error_line, stream  # noqa: F401

SEQ = 64
DECODER_OVERRIDES = ["model=gpt_tiny", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
                     f"model.max_seq_len={SEQ}", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=2",
                     "logger=none", "callbacks=[]", "trainer.progress_bar=false", "trainer.val_batches=1",
                     "trainer.val_check_interval=2"]


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, stream):  # noqa: F811
    import lmkit.api

    root = tmp_path_factory.mktemp("ralm-decoder")
    lmkit.api.run(DECODER_OVERRIDES + stream[1], root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def leaky_store(encoder, stream, tmp_path_factory):  # noqa: F811
    """A flat store of the very text that is evaluated (the leakage case)."""
    from lmkit_retrieval.store import build_store

    return build_store(tmp_path_factory.mktemp("ralm") / "store", stream[0], encoder, chunk_len=CHUNK,
                       data={"split": "train"})


def _gpt(decoder_run):
    from lmkit.generation import read_model

    model, tok, _, _ = read_model(decoder_run)
    return model.eval(), tok


class CopyOracle(torch.nn.Module):
    """A decoder that copies (an induction head by construction): after an n-gram seen before in its input it
    predicts, with probability 1/2, the token that followed the n-gram's latest earlier occurrence (else uniform)."""

    kind = "decoder"
    max_seq_len = SEQ

    def __init__(self, vocab: int, n: int = 4):
        super().__init__()
        self.vocab, self.n = vocab, n
        self.scale = torch.nn.Parameter(torch.tensor(float(np.log(vocab + 1))))  # p(copy) = 1/2

    def forward(self, ids):
        eq = ids[:, :, None] == ids[:, None, :]  # [B, t, j]
        match = eq.clone()
        for i in range(1, self.n):
            match[:, :i] = False
            match[:, :, :i] = False
            match[:, i:, i:] &= eq[:, :-i, :-i]
        t = ids.shape[1]
        match &= torch.ones(t, t, dtype=torch.bool).tril(-1)  # earlier occurrences only (j < t)
        latest = (match * torch.arange(1, t + 1)).argmax(-1)  # [B, t]: the latest matching j
        pred = ids.gather(1, (latest + 1).clamp(max=t - 1))
        hit = match.any(-1, keepdim=True)
        return torch.nn.functional.one_hot(pred, self.vocab).float() * self.scale * hit

    def logits(self, hidden):
        return hidden


def _brute_rows(stream, f, e, seq_len, prefix_tokens):
    ctx_len = min(e - 1, seq_len - len(prefix_tokens))
    row = list(prefix_tokens) + stream[e - 1 - ctx_len:e - 1].tolist()
    n = e - f
    return row, [len(row) - n + t for t in range(n)], stream[f:e].tolist()


def test_rows_are_neighbours_then_context_and_every_token_is_scored_once(stream):  # noqa: F811
    from lmkit_retrieval.ralm import build_rows, windows

    rng = np.random.default_rng(0)
    s = np.concatenate([[0], stream[0][:300]]).astype(np.int64)
    firsts, ends = windows(len(s), SEQ, 4)
    prefix = rng.integers(1, 200, size=(len(firsts), 2 * CHUNK))
    real = rng.random((len(firsts), 2 * CHUNK)) < 0.7
    seen = []
    for mode_prefix, mode_real in ((None, None), (prefix, real)):
        ids, pos, tgt, valid = build_rows(s, firsts, ends, SEQ, pad_id=-1, prefix=mode_prefix, prefix_real=mode_real)
        scored = []
        for b, (f, e) in enumerate(zip(firsts, ends)):
            nb = [] if mode_prefix is None else mode_prefix[b][mode_real[b]].tolist()
            row, p, t = _brute_rows(s, f, e, SEQ, nb)
            assert ids[b, :len(row)].tolist() == row and (ids[b, len(row):] == -1).all()
            assert len(row) <= SEQ and pos[b][valid[b]].tolist() == p and tgt[b][valid[b]].tolist() == t
            scored += list(range(f, e))
        seen.append(scored)
    assert seen[0] == seen[1] == list(range(1, len(s)))  # the same targets, each once, in both modes


def test_queries_are_the_tokens_before_each_window_and_neighbours_are_the_stores(encoder, leaky_store,  # noqa: F811
                                                                                 stream):
    from lmkit_retrieval.ralm import Retriever, queries

    s = np.concatenate([[encoder.tokenizer.eos_id], stream[0][:400]]).astype(np.int64)
    firsts = np.array([5, 40, 101, 250])
    q, real = queries(s, firsts, 32, encoder.tokenizer.pad_id)
    tokens, tok_real, ids = Retriever(leaky_store, encoder, k=2)(q, real, firsts - 32, firsts + 3)
    for b, f in enumerate(firsts):
        row = s[max(0, f - 32):f]
        assert q[b][real[b]].tolist() == row.tolist()
        alone = encoder.embed(row[None])
        np.testing.assert_allclose(encoder.embed(q[b:b + 1], real[b:b + 1]), alone, rtol=1e-4, atol=1e-5)
        expected, _ = leaky_store.search(alone, 2)
        assert ids[b].tolist() == expected[0].tolist()
        values = leaky_store.neighbours(expected[0][::-1])  # the best last, next to the context
        pad = leaky_store.manifest["pad_id"]
        assert tokens[b][tok_real[b]].tolist() == [t for t in values.reshape(-1).tolist() if t != pad]


def test_without_neighbours_it_is_lmkits_sliding_window(decoder_run, stream):  # noqa: F811
    from lmkit.evaluation.corpus import score_decoder
    from lmkit.evaluation.scorer import Scorer
    from lmkit_retrieval.ralm import score_ralm

    model, tok = _gpt(decoder_run)
    s = np.concatenate([[tok.eos_id], stream[0][:500]]).astype(np.int64)
    lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    ref = score_decoder(Scorer(model, tok, "gpt", batch_size=8, max_length=SEQ), s, lengths, 4)

    def nothing(q, real, lo, hi):  # an empty retrieval: k neighbours that are all padding
        return np.zeros((len(q), 32), np.int64), np.zeros((len(q), 32), bool), np.full((len(q), 1), -1)

    for retriever in (None, nothing):
        out = score_ralm(model, s, lengths, seq_len=SEQ, stride=4, retriever=retriever, pad_id=tok.eos_id,
                         batch_size=16)
        for mode in ("without", "with"):
            assert out[mode].tokens == ref.tokens and out[mode].bytes == ref.bytes
            assert abs(out[mode].loss - ref.loss) < 1e-5
            assert abs(out[mode].metrics()["bits_per_byte"] - ref.metrics()["bits_per_byte"]) < 1e-5


def test_with_neighbours_each_window_is_scored_as_lmkits_scorer_scores_neighbours_plus_context(decoder_run,
                                                                                                stream):  # noqa: F811
    from lmkit.evaluation.scorer import Scorer
    from lmkit_retrieval.ralm import score_ralm, windows

    model, tok = _gpt(decoder_run)
    s = np.concatenate([[tok.eos_id], stream[0][:300]]).astype(np.int64)
    lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    rng = np.random.default_rng(1)
    firsts, ends = windows(len(s), SEQ, 4)
    given = {int(f): (rng.integers(3, 250, 40), rng.random(40) < 0.6) for f in firsts}

    recorded = []

    def by_first(q, real, lo, hi):  # neighbours drawn at random per window, some positions padding
        out = [given[int(f)] for f in recorded.pop(0)]
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), np.zeros((len(q), 1), np.int64)

    for at in range(0, len(firsts), 16):
        recorded.append(firsts[at:at + 16])
    out = score_ralm(model, s, lengths, seq_len=SEQ, stride=4, retriever=by_first, pad_id=tok.eos_id, batch_size=16)
    requests = []
    for f, e in zip(firsts, ends):
        tokens, real = given[int(f)]
        nb = tokens[real].tolist()
        c = min(e - 1, SEQ - len(nb))
        requests.append((nb + s[e - 1 - c:f].tolist(), s[f:e].tolist()))
    ref = -sum(ll for ll, _ in Scorer(model, tok, "gpt", batch_size=8, max_length=SEQ).loglikelihood_tokens(requests))
    assert out["with"].nll == pytest.approx(ref, rel=1e-5)
    assert abs(out["with"].nll - out["without"].nll) > 0.2  # the neighbours did change the predictions


def test_a_store_holding_the_evaluated_text_lets_a_copying_model_predict_it(encoder, leaky_store,  # noqa: F811
                                                                             stream):
    from lmkit_retrieval.ralm import Retriever, score_ralm
    from lmkit_retrieval.store import document_ids

    tok = encoder.tokenizer
    s = np.concatenate([[tok.eos_id], stream[0][:600]]).astype(np.int64)
    lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    oracle = CopyOracle(tok.vocab_size)
    # query_len = chunk_len: the 2-step encoder then finds the query's own chunk most often
    leaky = score_ralm(oracle, s, lengths, seq_len=SEQ, stride=4, query_len=CHUNK,
                       retriever=Retriever(leaky_store, encoder, 1), pad_id=tok.eos_id)
    docs = document_ids(stream[0], tok.eos_id)
    excluded = score_ralm(oracle, s, lengths, seq_len=SEQ, stride=4, query_len=CHUNK, pad_id=tok.eos_id,
                          retriever=Retriever(leaky_store, encoder, 1, np.concatenate([docs[:1], docs])))
    bpb = {name: out[mode].metrics()["bits_per_byte"]
           for name, out, mode in (("plain", leaky, "without"), ("leaky", leaky, "with"),
                                   ("excluded", excluded, "with"))}
    assert leaky["without"].nll == pytest.approx(excluded["without"].nll)
    assert bpb["leaky"] < 0.5 * bpb["plain"], bpb  # the neighbour's continuation holds the next tokens
    assert bpb["excluded"] > 1.5 * bpb["leaky"], bpb  # other speeches rarely hold them


def test_cli_writes_both_scores(decoder_run, leaky_store, tmp_path, capsys):
    import lmkit.cli

    out = tmp_path / "ralm.json"
    argv = ["retrieval", "evaluate", str(decoder_run), f"store={leaky_store.path}", "max_tokens=200", "k=1", f"seq_len={SEQ}",
            f"output={out}", "device=cpu"]
    assert lmkit.cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["seq_len"] == SEQ and results["stride"] == 4 and results["query_len"] == 32
    assert results["with_retrieval"]["tokens"] == results["without_retrieval"]["tokens"] == 200
    assert results["neighbour_tokens_per_window"] > 0
    assert f"{results['with_retrieval']['bits_per_byte']:.4f}" in printed and "without retrieval" in printed


def test_bad_input_is_one_line(decoder_run, encoder_run, leaky_store, tmp_path, capsys):  # noqa: F811
    store = str(leaky_store.path)
    base = ["retrieval", "evaluate", str(decoder_run), f"store={store}", "max_tokens=50", f"seq_len={SEQ}"]
    one_error_line(capsys, base + ["stride=0"], "stride=0 must be a whole number >= 1")
    one_error_line(capsys, base + ["query_len=0"], "query_len=0 must be a whole number >= 1")
    one_error_line(capsys, ["retrieval", "evaluate", str(encoder_run), f"store={store}"], "needs a decoder")
    one_error_line(capsys, base + ["seq_len=16"], "leave no room for stride=4 in seq_len=16")
    other = tmp_path / "other"
    shutil.copytree(store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["build"]["tokenizer"]["fingerprint"] = "0" * 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_error_line(capsys, [*base[:3], f"store={other}", *base[4:]], "was built with another tokenizer")
    one_error_line(capsys, base + ["exclude_same_document=true"], "no neighbour can come from the evaluated")


def test_document_numbers_of_a_validation_split_follow_the_training_splits_in_a_split_all_store():
    from types import SimpleNamespace

    from lmkit.errors import ConfigError
    from lmkit_retrieval.ralm import document_offset
    from lmkit_retrieval.store import document_ids
    from retrieval_helpers import reference_doc_ids

    eos = 9
    everything = np.array([1, 2, eos, 3, eos, 4, 5, eos, 6, 7, eos, 8])
    val = everything[-5:]  # validation is the stream's tail
    parts = {"all": everything, "val": val}
    info = {"path": "corpus.txt", "source": "text", "split": "val"}
    for stored, expected in (("all", reference_doc_ids(everything, eos)[-5:]), ("val", reference_doc_ids(val, eos))):
        store = SimpleNamespace(path="s", manifest={"data": {"path": "corpus.txt", "source": "text", "split": stored}})
        offset = document_offset(store, info, eos, parts.__getitem__)
        assert (document_ids(val, eos) + offset).tolist() == expected.tolist()
    store = SimpleNamespace(path="s", manifest={"data": {"path": "other.txt", "source": "text", "split": "all"}})
    with pytest.raises(ConfigError, match="no neighbour can come from the evaluated"):
        document_offset(store, info, eos, parts.__getitem__)
