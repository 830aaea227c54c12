"""Streaming, sharded tokenization (lmkit.data.tokenize_stream) against the in-memory reference
(lmkit.data.cache.build_token_array, which encodes each whole document at once)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lmkit.data import tokenize_stream as ts
from lmkit.data.cache import build_token_array
from lmkit.data.sources import BUILTIN_CORPORA, TextSource
from lmkit.errors import DataError
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import TrainedTokenizer, train_hf_tokenizer

SHAKESPEARE = BUILTIN_CORPORA["tinyshakespeare"].read_text()[:120_000]
# awkward text: CRLF, blank runs, unicode, contractions, a whitespace-only document, long lines
ODD = ("héllo wörld — naïve café\r\nIt's 'quoted'\r\n\r\nnext\n\n\n  indented\tline\nAB\nCD\n" * 300
       + "x" * 5000 + "\n" + "日本語のテキスト\n" * 200)


@pytest.fixture(scope="module")
def tokenizers():
    out = {"byte": ByteTokenizer()}
    for kind in ("bpe", "wordpiece"):
        out[kind] = TrainedTokenizer(train_hf_tokenizer(kind, [SHAKESPEARE, ODD], 600), kind)
    return out


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(SHAKESPEARE)
    (d / "b.txt").write_text(ODD)
    (d / "c.txt").write_text(" \n\t \n")  # blank: no document
    (d / "d.txt").write_text("short one")
    return d


def _build(source, tok, cache, **kw):
    small = dict(piece_chars=700, batch_chars=3000, buffer_tokens=997, block_bytes=1111)
    return ts.build_token_cache(source, tok, cache / "tokens" / "out.npy", **{**small, **kw})


@pytest.mark.parametrize("kind", ["byte", "bpe", "wordpiece"])
@pytest.mark.parametrize("separator", [None, "\n\n"])
def test_streamed_tokens_equal_whole_document_tokenization(tmp_path, tokenizers, kind, separator):
    tok = tokenizers[kind]
    source = TextSource(_corpus(tmp_path), separator)
    expected = build_token_array(source, tok)
    got = _build(source, tok, tmp_path / "cache")
    assert isinstance(got, np.memmap) and got.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(got), expected)
    # the documents really were cut into many pieces (small blocks/pieces), so the cuts are what is tested
    pieces = list(ts.file_pieces(source.files[0], separator, ts.cut_rule(tok), 700, 1111))
    assert sum(not end for _, end in pieces) > 20


def test_cuts_are_the_only_difference_between_piece_sizes(tmp_path, tokenizers):
    """Shard/piece boundaries never change the concatenation: every piece size gives the same file bytes."""
    source = TextSource(_corpus(tmp_path))
    blobs = set()
    for i, piece in enumerate((50, 700, 10_000, 10 ** 9)):
        _build(source, tokenizers["bpe"], tmp_path / f"c{i}", piece_chars=piece)
        blobs.add((tmp_path / f"c{i}" / "tokens" / "out.npy").read_bytes())
    assert len(blobs) == 1


def test_one_and_several_workers_write_identical_shards(tmp_path, tokenizers):
    source = TextSource(_corpus(tmp_path))
    for w in (1, 2, 3):
        _build(source, tokenizers["bpe"], tmp_path / f"w{w}", workers=w)
    files = [sorted((tmp_path / f"w{w}" / "tokens" / "files").glob("*.npy")) for w in (1, 2, 3)]
    assert len(files[0]) == 4
    for a, b, c in zip(*files):
        assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert (tmp_path / "w1/tokens/out.npy").read_bytes() == (tmp_path / "w3/tokens/out.npy").read_bytes()


def test_changed_file_invalidates_only_its_shard(tmp_path, tokenizers):
    tok = tokenizers["bpe"]
    d = _corpus(tmp_path)
    rebuilt = []
    _build(TextSource(d), tok, tmp_path / "cache", on_shard=rebuilt.append)
    assert len(rebuilt) == 4
    rebuilt.clear()
    (d / "b.txt").write_text(ODD + "an edit")
    source = TextSource(d)
    got = _build(source, tok, tmp_path / "cache", on_shard=rebuilt.append)
    assert [p.name for p in rebuilt] == [f"{ts.file_shard_key(d / 'b.txt', None, tok)}.npy"]
    np.testing.assert_array_equal(np.asarray(got), build_token_array(source, tok))


def _leftovers(cache):
    return [p.name for p in cache.rglob("*") if ".tmp" in p.name]


def test_interrupt_between_shards_leaves_no_complete_cache_and_resumes(tmp_path, tokenizers):
    tok = tokenizers["byte"]
    source = TextSource(_corpus(tmp_path))
    cache = tmp_path / "cache"

    def boom(shard):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(source, tok, cache, on_shard=boom)
    assert not (cache / "tokens" / "out.npy").exists() and not _leftovers(cache)
    done = []
    got = _build(source, tok, cache, on_shard=done.append)
    assert len(done) == 3  # the first file's shard was complete and is reused
    np.testing.assert_array_equal(np.asarray(got), build_token_array(source, tok))


def test_interrupt_inside_a_shard_leaves_nothing_complete_looking(tmp_path, tokenizers, monkeypatch):
    tok = tokenizers["bpe"]
    source = TextSource(_corpus(tmp_path))
    cache = tmp_path / "cache"
    calls = []
    real = ts.encode_pieces

    def failing(*a):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed mid-file")
        return real(*a)

    monkeypatch.setattr(ts, "encode_pieces", failing)
    with pytest.raises(RuntimeError):
        _build(source, tok, cache, buffer_tokens=10)  # tokens of earlier batches already on disk
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("*.done")) and not _leftovers(cache)
    monkeypatch.setattr(ts, "encode_pieces", real)
    np.testing.assert_array_equal(np.asarray(_build(source, tok, cache)), build_token_array(source, tok))


def test_torn_shard_is_rebuilt_not_trusted(tmp_path, tokenizers):
    tok = tokenizers["byte"]
    source = TextSource(_corpus(tmp_path))
    _build(source, tok, tmp_path / "cache")
    shard = next((tmp_path / "cache" / "tokens" / "files").glob("*.npy"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated, marker still there
    assert ts.shard_complete(shard, np.uint16) is None
    (tmp_path / "cache" / "tokens" / "out.npy").unlink()
    np.testing.assert_array_equal(np.asarray(_build(source, tok, tmp_path / "cache")), build_token_array(source, tok))


@pytest.mark.parametrize("content, message", [
    (b"a" * 5000 + b"\x00", "binary file"),
    (b"a" * 5000 + b"caf\xe9", "bad byte at offset 5003"),
    (b"a" * 1110 + "é".encode() + b"\xff", "bad byte at offset 1112"),  # a character split across two blocks
])
def test_bad_bytes_late_in_a_file_give_the_whole_file_message(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        _build(TextSource(f), ByteTokenizer(), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy")) and not _leftovers(tmp_path / "cache")


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 48 MB file: the old path held the text, its bytes and 2 bytes per token (~200 MB); streaming holds blocks."""
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(48):
            f.write(BUILTIN_CORPORA["tinyshakespeare"].read_text()[:1_000_000])
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from lmkit.data.tokenize_stream import build_token_cache
        from lmkit.data.sources import TextSource
        from lmkit.tokenizers.byte import ByteTokenizer
        small = Path({str(tmp_path)!r}) / "small.txt"
        small.write_text("warm up " * 1000)
        build_token_cache(TextSource(small), ByteTokenizer(), Path({str(tmp_path)!r}) / "c0" / "t.npy")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = build_token_cache(TextSource({str(big)!r}), ByteTokenizer(), Path({str(tmp_path)!r}) / "c1" / "t.npy")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(t), before, after)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    n, before, after = map(int, out)
    assert n == 48_000_000 + 1  # one document: 48 MB of bytes and one EOS
    assert (after - before) * 1024 < 40e6, f"peak RSS grew {(after - before) / 1024:.0f} MB for a 48 MB file"


def test_a_killed_runs_temporary_files_are_removed(tmp_path, tokenizers):
    """SIGKILL skips every cleanup: the next run deletes temporaries whose process is gone, and only those."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = tmp_path / "cache" / "tokens" / "files"
    files.mkdir(parents=True)
    orphan, foreign = files / f"abc.npy.tmp{dead.pid}", files / f"abc.npy.tmp{dead.pid}x"
    mine = tmp_path / "cache" / "tokens" / "out.npy.tmp1"  # pid 1 (init) is alive
    for p in (orphan, foreign, mine):
        p.write_bytes(b"partial")
    _build(TextSource(_corpus(tmp_path)), tokenizers["byte"], tmp_path / "cache")
    assert not orphan.exists() and foreign.exists() and mine.exists()
