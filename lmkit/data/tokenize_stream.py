"""Streaming, sharded, parallel tokenization into the token cache.

A corpus of any size is tokenized with bounded memory: text files are read in blocks
(``BLOCK_BYTES``), cut into pieces at points where cutting cannot change the tokens, encoded
in batches (HF's ``encode_batch`` runs Rust threads; ``workers`` > 1 adds processes over
batches) and appended through a small buffer to a ``.npy`` shard per file. The cache the
datamodule reads is the concatenation of the shards as one memory-mapped ``.npy`` (a hard
link to the shard when the corpus is one file).

Exactness: the output is byte-identical to encoding each whole document (the old in-memory
path) and independent of ``workers``, since batches are formed from the input alone and
written in input order. Each file's shard is keyed by the file's identity (resolved path,
size, mtime — the same identity as the source fingerprint), the separator and the tokenizer,
so a changed file re-tokenizes that file only. Every file is written under a temporary name,
fsynced and renamed; a shard counts as complete only with its marker (written last), so an
interrupted run leaves no complete-looking cache and a rerun redoes only unfinished files.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import struct
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lmkit.errors import DataError

FORMAT = "v1"  # bump when the shard layout or the piece rules change
BLOCK_BYTES = 4 << 20  # bytes read from a file at a time
PIECE_CHARS = 64 << 10  # a document longer than this is cut into pieces where the tokenizer allows it
BATCH_CHARS = 1 << 20  # characters encoded per batch (one unit of work for a worker process)
BUFFER_TOKENS = 1 << 20  # tokens buffered before they are appended to the shard file
_HEADER_BYTES = 128  # fixed .npy header, patched with the final length on close


def default_workers() -> int:
    """``LMKIT_TOKENIZE_WORKERS`` processes (default 1: HF's encode_batch already spreads over the cores)."""
    try:
        return max(1, int(os.environ.get("LMKIT_TOKENIZE_WORKERS", "1")))
    except ValueError:
        raise DataError(f"LMKIT_TOKENIZE_WORKERS={os.environ['LMKIT_TOKENIZE_WORKERS']!r} is not a whole number; "
                        f"set it to the number of tokenizing processes, e.g. 2.") from None


# -- where a document may be cut ----------------------------------------------------------------------------------
def cut_rule(tokenizer) -> str:
    """How a long document may be cut without changing its tokens.

    ``"any"`` (bytes: the tokens of a concatenation are the concatenation), ``"newline"``
    (lmkit's BPE and WordPiece: their pre-tokenizers never join across a lone newline between
    two printable ASCII characters) or ``"none"`` (anything else: documents are encoded whole).
    """
    from lmkit.tokenizers.byte import ByteTokenizer
    from lmkit.tokenizers.trained import TrainedTokenizer

    if type(tokenizer) is ByteTokenizer:
        return "any"
    if type(tokenizer) is TrainedTokenizer and tokenizer.kind in ("bpe", "wordpiece"):
        return "newline"
    return "none"


def _safe_cut(text: str, start: int, limit: int, rule: str) -> int:
    """The largest cut position ``start < c <= limit`` allowed by ``rule``, or ``start`` when there is none."""
    if rule == "any":
        return limit
    if rule != "newline":
        return start
    i = text.rfind("\n", start, limit)
    while i > start:
        if i + 1 < len(text) and "!" <= text[i - 1] <= "~" and "!" <= text[i + 1] <= "~":  # printable ASCII
            return i + 1
        i = text.rfind("\n", start, i)
    return start


# -- reading ------------------------------------------------------------------------------------------------------
def _blocks(path: Path, block_bytes: int) -> Iterator[str]:
    """The text of ``path`` in blocks, with the same checks (and messages) as reading it whole."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(block_bytes)
                if b"\x00" in data:
                    raise DataError(f"'{path}' looks like a binary file (it contains NUL bytes), not text. Point "
                                    f"data.path at UTF-8 text files.")
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise DataError(f"'{path}' is not valid UTF-8 (bad byte at offset {consumed - pending + e.start}). "
                                    f"Convert it to UTF-8, e.g. with iconv.") from None
                consumed += len(data)
                if text:
                    yield text
                if not data:
                    return
    except OSError as e:
        raise DataError(f"'{path}' cannot be read: {e.strerror or e}. Check data.path and the file's "
                        f"permissions.") from None


def file_pieces(path: Path, separator: str | None, rule: str, piece_chars: int = PIECE_CHARS,
                block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces of a text file, in order, holding at most about one block and one piece.

    Documents are the file (``separator`` None) or its ``separator``-split parts; blank documents are
    skipped as :class:`lmkit.data.sources.TextSource` does. A document is cut where ``rule`` allows.
    """
    doc = _Doc()
    tail = ""
    for block in _blocks(path, block_bytes):
        tail += block
        if separator:
            *complete, tail = tail.split(separator)
            for part in complete:
                yield from doc.add(part)
                yield from doc.end()
        limit = len(tail) - (len(separator) - 1 if separator else 0)  # never cut a separator in two
        start = 0  # pieces are sliced out by position; the remainder is copied once per block
        while len(tail) - start > piece_chars:
            cut = _safe_cut(tail, start, min(limit, start + piece_chars), rule)
            if cut <= start:
                break  # no safe cut yet: keep reading (memory grows only for such documents)
            yield from doc.add(tail[start:cut])
            start = cut
        tail = tail[start:]
    yield from doc.add(tail)
    yield from doc.end()


class _Doc:
    """Pieces of the current document; held back while all of it so far is whitespace (a blank document is skipped)."""

    def __init__(self):
        self.held: list[str] = []
        self.nonblank = False

    def add(self, piece: str) -> Iterator[tuple[str, bool]]:
        if not piece:
            return
        if self.nonblank:
            yield piece, False
        elif piece.isspace():
            self.held.append(piece)
        else:
            self.nonblank = True
            yield "".join(self.held) + piece, False
            self.held = []

    def end(self) -> Iterator[tuple[str, bool]]:
        if self.nonblank:
            yield "", True
        self.held, self.nonblank = [], False


def _merge_ends(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Fold each ``("", True)`` end marker into the piece before it."""
    prev = None
    for text, end in pieces:
        if prev is not None:
            if end and not text:
                yield prev[0], True
                prev = None
                continue
            yield prev
        prev = (text, end)
    if prev is not None:
        yield prev


def batches(pieces: Iterable[tuple[str, bool]], batch_chars: int = BATCH_CHARS) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces grouped into batches of about ``batch_chars`` characters (a function of the input only)."""
    batch, size = [], 0
    for piece in _merge_ends(pieces):
        batch.append(piece)
        size += len(piece[0]) + 1
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# -- encoding -----------------------------------------------------------------------------------------------------
def encode_pieces(tokenizer, batch: list[tuple[str, bool]], dtype) -> np.ndarray:
    """The tokens of a batch of pieces, EOS after each piece that ends a document."""
    eos = tokenizer.eos_id
    texts = [t for t, _ in batch]
    fast = getattr(tokenizer, "encode_array", None)
    if fast is not None:  # bytes: no Python ints at all
        parts = []
        eos_arr = np.array([eos], dtype=dtype)
        for (_, end), text in zip(batch, texts):
            parts.append(fast(text).astype(dtype, copy=False))
            if end:
                parts.append(eos_arr)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    encoded = tokenizer.encode_batch(texts)
    total = sum(len(ids) for ids in encoded) + sum(end for _, end in batch)
    eos_list = [eos]
    flat = chain.from_iterable(chain(ids, eos_list) if end else ids for ids, (_, end) in zip(encoded, batch))
    return np.fromiter(flat, dtype=dtype, count=total)


_WORKER: dict = {}


def _worker_init(tokenizer, dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked child: processes give the parallelism
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _worker_encode(batch):
    return encode_pieces(_WORKER["tokenizer"], batch, _WORKER["dtype"])


def encoded_batches(tokenizer, batch_iter: Iterable[list], dtype, workers: int) -> Iterator[np.ndarray]:
    """``encode_pieces`` of each batch, in input order; with ``workers`` > 1 in that many processes, at most
    ``2 * workers`` batches in flight (so memory stays bounded however large the corpus)."""
    if workers <= 1:
        for batch in batch_iter:
            yield encode_pieces(tokenizer, batch, dtype)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer, dtype)) as pool:
        pending: deque = deque()
        for batch in batch_iter:
            pending.append(pool.apply_async(_worker_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- writing ------------------------------------------------------------------------------------------------------
def _npy_header(dtype, n: int) -> bytes:
    d = f"{{'descr': {np.dtype(dtype).str!r}, 'fortran_order': False, 'shape': ({n},), }}"
    body = d.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


class ShardWriter:
    """Appends token arrays to a ``.npy`` file through a buffer of ``buffer_tokens``; on :meth:`commit` the header
    gets the length, the file is fsynced and renamed into place. Until then it lives under a temporary name."""

    def __init__(self, path: Path, dtype, buffer_tokens: int = BUFFER_TOKENS):
        self.path, self.dtype, self.buffer_tokens = Path(path), np.dtype(dtype), buffer_tokens
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * _HEADER_BYTES)
        self.buffer: list[np.ndarray] = []
        self.buffered = self.n = 0

    def append(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        if self.buffered >= self.buffer_tokens:
            self._flush()

    def append_raw(self, src: Path, offset: int) -> None:
        """The token data of another shard (from ``offset`` bytes on), copied without decoding."""
        self._flush()
        with open(src, "rb") as f:
            f.seek(offset)
            start = self.f.tell()
            shutil.copyfileobj(f, self.f, 8 << 20)
            self.n += (self.f.tell() - start) // self.dtype.itemsize

    def _flush(self) -> None:
        for a in self.buffer:  # written as they are: no concatenated copy
            self.f.write(np.ascontiguousarray(a, dtype=self.dtype).data)
            self.n += len(a)
        self.buffer, self.buffered = [], 0

    def commit(self) -> int:
        self._flush()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.n

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def shard_complete(path: Path, dtype) -> int | None:
    """Token count of a finished shard, or None if it is missing, unfinished or damaged (then it is rebuilt)."""
    try:
        n = json.loads(_marker(path).read_text())["tokens"]
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        ok = arr.ndim == 1 and arr.dtype == dtype and len(arr) == n and \
            path.stat().st_size == _HEADER_BYTES + n * np.dtype(dtype).itemsize
        return n if ok else None
    except Exception:  # no marker, a torn or foreign file: it is only a cache
        return None


def write_shard(path: Path, dtype, arrays: Iterable[np.ndarray], buffer_tokens: int = BUFFER_TOKENS) -> int:
    """Write ``arrays`` as one shard, then its completion marker; nothing complete-looking on failure."""
    _marker(path).unlink(missing_ok=True)
    writer = ShardWriter(path, dtype, buffer_tokens)
    try:
        for a in arrays:
            writer.append(a)
        n = writer.commit()
    except BaseException:
        writer.abort()
        raise
    tmp = _marker(path).with_name(_marker(path).name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"tokens": n, "format": FORMAT}))
    os.replace(tmp, _marker(path))
    return n


# -- the cache ----------------------------------------------------------------------------------------------------
def file_shard_key(path: Path, separator, tokenizer) -> str:
    st = path.stat()
    ident = f"{FORMAT}|{path.resolve()}:{st.st_size}:{st.st_mtime_ns}|{separator!r}|{tokenizer.fingerprint()}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _file_units(source) -> list[tuple[Path, str | None]] | None:
    """``(file, separator)`` of a plain-text source, or None for other sources (tokenized as one unit)."""
    from lmkit.data.sources import TextSource

    if isinstance(source, TextSource):
        return [(Path(f), source.separator) for f in source.files]
    return None


def build_token_cache(source, tokenizer, path: Path, workers: int | None = None, *,
                      on_shard: Callable[[Path], None] | None = None, piece_chars: int = PIECE_CHARS,
                      batch_chars: int = BATCH_CHARS, buffer_tokens: int = BUFFER_TOKENS,
                      block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Tokenize ``source`` into the cache file ``path`` (see the module docstring) and return it memory-mapped.

    Plain-text sources get one shard per file under ``path.parent / "files"`` (reused while the file is
    unchanged); other sources are streamed from ``documents()`` into ``path`` directly (any change
    re-tokenizes all of it). ``on_shard`` is called after each shard is written (tests interrupt there).
    """
    from lmkit.data.cache import token_dtype

    workers = default_workers() if workers is None else workers
    remove_orphans(path.parent)
    remove_orphans(path.parent / "files")
    dtype = np.dtype(token_dtype(tokenizer.vocab_size))
    rule = cut_rule(tokenizer)
    units = _file_units(source)
    if units is None:
        pieces = ((doc, True) for doc in source.documents())
        n = write_shard(path, dtype, encoded_batches(tokenizer, batches(pieces, batch_chars), dtype, workers),
                        buffer_tokens)
        _marker(path).unlink(missing_ok=True)  # the final cache has no marker: its atomic rename is the commit
        if n == 0:
            path.unlink(missing_ok=True)
    else:
        shards = []
        for f, sep in units:
            shard = path.parent / "files" / f"{file_shard_key(f, sep, tokenizer)}.npy"
            n = shard_complete(shard, dtype)
            if n is None:
                pieces = file_pieces(f, sep, rule, piece_chars, block_bytes)
                n = write_shard(shard, dtype, encoded_batches(tokenizer, batches(pieces, batch_chars), dtype, workers),
                                buffer_tokens)
                if on_shard is not None:
                    on_shard(shard)
            shards.append((shard, n))
        if sum(n for _, n in shards) > 0:
            _concatenate(shards, path, dtype)
    if not path.exists():
        raise DataError("the corpus is empty: no document contains any text. Check data.source / data.path.")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def remove_orphans(directory: Path) -> None:
    """Delete the temporary files of killed runs (``NAME.tmpPID`` whose process is gone) in ``directory``."""
    for tmp in directory.glob("*.tmp*") if directory.is_dir() else ():
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive under another user: not ours to delete
            pass


def _concatenate(shards: list[tuple[Path, int]], path: Path, dtype) -> None:
    """The cache file: a hard link to the only shard, else the shards' data copied one after another."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if len(shards) == 1:
        try:
            tmp.unlink(missing_ok=True)
            os.link(shards[0][0], tmp)
            os.replace(tmp, path)
            return
        except OSError:  # no hard links on this filesystem: copy
            tmp.unlink(missing_ok=True)
    writer = ShardWriter(path, dtype)
    try:
        for shard, _ in shards:
            writer.append_raw(shard, _HEADER_BYTES)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
