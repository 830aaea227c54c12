"""Corpus sources, token cache, packing, tokenizers and the resumable sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmkit.data.cache import load_tokens
from lmkit.data.datamodule import BlockDataset, split_tokens
from lmkit.data.sampler import StepBatchSampler
from lmkit.data.sources import BuiltinSource, HFDatasetSource, JsonlSource, TextSource
from lmkit.errors import DataError
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import load_or_train, load_tokenizer_file


def test_builtin_corpus_ships_inside_the_package():
    import lmkit

    src = BuiltinSource("tinyshakespeare")
    assert str(src.files[0]).startswith(str(__import__("pathlib").Path(lmkit.__file__).parent))
    text = next(src.documents())
    assert text.startswith("First Citizen:") and len(text) > 1_000_000


def test_packing_puts_eos_between_documents_and_cache_is_reused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("abc")
    (tmp_path / "docs" / "b.txt").write_text("de")
    tok = ByteTokenizer()
    tokens = load_tokens(TextSource(tmp_path / "docs"), tok, tmp_path / "cache")
    assert tokens.tolist() == [97, 98, 99, tok.eos_id, 100, 101, tok.eos_id]
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    cached = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = load_tokens(TextSource(tmp_path / "docs"), tok, tmp_path / "cache")
    assert again.tolist() == tokens.tolist() and cached[0].stat().st_mtime_ns == mtime


def test_damaged_token_cache_is_rebuilt(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    tok = ByteTokenizer()
    load_tokens(TextSource(tmp_path / "a.txt"), tok, tmp_path / "cache")
    path = next((tmp_path / "cache" / "tokens").glob("*.npy"))
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        tokens = load_tokens(TextSource(tmp_path / "a.txt"), tok, tmp_path / "cache")
    assert tokens.tolist()[:5] == list(b"hello")


def test_jsonl_and_hf_sources(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    assert list(JsonlSource(f).documents()) == ["one", "two"]
    assert list(HFDatasetSource(f, "json").documents()) == ["one", "two"]
    with pytest.raises(DataError, match="no field 'body'"):
        list(JsonlSource(f, text_field="body").documents())


@pytest.mark.parametrize("content, message", [
    (b"", "corpus is empty"),
    (b"\x00\x01\x02binary", "binary file"),
    (b"caf\xe9 latin-1", "not valid UTF-8"),
])
def test_broken_corpora_are_refused(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_tokens(TextSource(f), ByteTokenizer(), tmp_path / "cache")


def test_missing_path_is_refused():
    with pytest.raises(DataError, match="does not exist"):
        TextSource("/no/such/corpus.txt")


def test_corpus_smaller_than_one_step_is_refused(tmp_path, tiny):
    from lmkit.api import build

    f = tmp_path / "small.txt"
    f.write_text("tiny corpus " * 10)
    with pytest.raises(DataError, match="corpus is too small"):
        build(tiny + ["data=text", f"data.path={f}"], tmp_path / "run")


def test_blocks_stride_overlap_by_one_for_causal_lm():
    tokens = np.arange(20)
    ds = BlockDataset(tokens, block_len=5, stride=4)
    assert len(ds) == 4
    assert ds[(1, 0)][0].tolist() == [4, 5, 6, 7, 8]
    splits = split_tokens(tokens, 0.25)
    assert len(splits.val) == 5 and splits.val[0] == 15


def test_sampler_order_is_a_function_of_step_only():
    full = StepBatchSampler(100, micro_batch_size=4, grad_accum=2, seed=3)
    steps = list(full)
    assert len(steps) == len(full) == 12
    resumed = StepBatchSampler(100, 4, 2, seed=3, start_step=lambda: 5)
    assert list(resumed) == steps[5:]
    epoch_items = [i for s in steps for i, _ in s]
    assert len(set(epoch_items)) == len(epoch_items)  # no repeats within an epoch
    other_seed = [i for s in StepBatchSampler(100, 4, 2, seed=4) for i, _ in s]
    assert other_seed != epoch_items


def test_ranks_take_disjoint_slices_that_tile_the_single_rank_order():
    single = StepBatchSampler(64, micro_batch_size=8, grad_accum=1, seed=0)
    r0 = StepBatchSampler(64, 4, 1, seed=0, rank=0, world_size=2)
    r1 = StepBatchSampler(64, 4, 1, seed=0, rank=1, world_size=2)
    for s_full, s0, s1 in zip(single, r0, r1):
        assert [i for i, _ in s0] + [i for i, _ in s1] == [i for i, _ in s_full]


def test_batch_size_ramp():
    s = StepBatchSampler(10_000, micro_batch_size=2, grad_accum=4, seed=0, ramp_start=1, ramp_steps=6)
    assert [s.micro_batches_at(i) for i in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [len(s.keys_for_step(i)) for i in (0, 6)] == [2, 8]
    assert s.stream_offset(7) == 2 * (1 + 1 + 2 + 2 + 3 + 3 + 4)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizers_are_cached_and_reused(tmp_path, kind, monkeypatch):
    text = (BuiltinSource("tinyshakespeare").files[0]).read_text()[:200_000]
    docs = lambda: iter(text.split("\n\n"))  # noqa: E731
    tok = load_or_train(kind, docs, "fp", tmp_path, vocab_size=500, num_sentinels=4)
    assert tok.vocab_size == 504 and tok.sentinel_id(0) == 503 and tok.sentinel_id(3) == 500
    assert tok.special_table()[[tok.mask_id, tok.cls_id, tok.sentinel_id(0)]].all()
    import lmkit.tokenizers.trained as trained

    monkeypatch.setattr(trained, "train_hf_tokenizer", lambda *a, **k: pytest.fail("retrained instead of reusing"))
    again = load_or_train(kind, docs, "fp", tmp_path, vocab_size=500, num_sentinels=4)
    ids = tok.encode("First Citizen: speak, speak.")
    assert again.encode("First Citizen: speak, speak.") == ids
    tok.save(tmp_path / "t.json")
    assert load_tokenizer_file(tmp_path / "t.json").fingerprint() == tok.fingerprint()
    starts = tok.word_starts(torch.tensor(ids))
    assert starts[0] and starts.sum() >= 3


def test_byte_tokenizer_round_trip_and_word_starts():
    tok = ByteTokenizer(num_sentinels=2)
    ids = tok.encode("héllo wörld")
    assert tok.decode(ids) == "héllo wörld"
    assert tok.word_starts(torch.tensor(tok.encode("ab cd"))).tolist() == [True, False, False, True, False]
    assert tok.vocab_size == 256 + 10 + 2 and tok.sentinel_id(0) == tok.vocab_size - 1
    assert tok.token_byte_lengths()[:256].sum() == 256 and tok.token_byte_lengths()[256:].sum() == 0


def test_bpe_tokenizer_trains_end_to_end(tmp_path, tiny):
    from lmkit.api import run

    s = run(tiny + ["tokenizer=bpe", "tokenizer.vocab_size=400", "trainer.max_steps=3"], tmp_path)
    assert s["end"]["val/bpb"] < s["start"]["val/bpb"]
    assert (tmp_path / "tokenizer.json").exists()


def test_damaged_tokenizer_cache_entry_is_trained_again(tmp_path, capsys):
    from lmkit.tokenizers.trained import load_or_train

    texts = lambda: ["to be or not to be, that is the question"] * 50  # noqa: E731
    first = load_or_train("bpe", texts, "corpus", tmp_path, vocab_size=300, num_sentinels=0, min_frequency=1)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    entry.write_text("{ not json")
    again = load_or_train("bpe", texts, "corpus", tmp_path, vocab_size=300, num_sentinels=0, min_frequency=1)
    assert again.encode("to be or not") == first.encode("to be or not")
    err = capsys.readouterr().err
    assert err.count("lmkit: warning:") == 1 and "is damaged" in err and "training it again" in err
    assert entry.read_text().startswith("{") and load_or_train(  # repaired on disk
        "bpe", texts, "corpus", tmp_path, vocab_size=300, num_sentinels=0, min_frequency=1).vocab_size == first.vocab_size
