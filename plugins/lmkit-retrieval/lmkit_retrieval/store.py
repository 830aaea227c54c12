"""The retrieval datastore (RETRO, Borgeaud et al. 2021): keys = embeddings of chunks, values = chunk + continuation.

The token stream (documents packed with ``<eos>`` after each, as lmkit packs a corpus) is cut
into ``n = len // chunk_len`` chunks that tile it; a tail shorter than a chunk is only ever
a continuation. The value of chunk ``i`` is its tokens followed by the next ``chunk_len``
tokens of the stream (chunk ``i+1``; the last chunk's continuation is the tail, padded with
``<pad>``), so the store keeps the stream once, as ``n+1`` rows.

Documents: token ``t`` belongs to document ``#<eos> before t`` (the ``<eos>`` ends its own
document, as :func:`lmkit.models.layers.document_ids_from_separators` numbers them), counted
from the start of the stream. Each chunk records the documents its value spans, first and
last (``docs.npy`` [n, 2]); a search that excludes document ``d`` drops every chunk whose
value overlaps ``d``, so a training query never sees its own document (RETRO's rule), not even
through a neighbour's continuation.

Directory (all arrays ``.npy``, opened memory-mapped):

* ``chunks.npy`` [n+1, chunk_len] token ids (uint16/uint32 as lmkit's token cache),
* ``docs.npy`` [n, 2] int64 document span of each value,
* ``embeddings.npy`` [n, d] float32 mean-pooled encoder states (not normalised),
* ``keys.npy`` [d+1, d] float32 the transform from embeddings to index keys (:mod:`lmkit_retrieval.keys`:
  centered by default), fitted on ``embeddings.npy`` and applied to every query,
* ``index.faiss`` the faiss index of the keys (:mod:`lmkit_retrieval.index`),
* ``manifest.json`` settings, fingerprints, file sizes, and ``complete`` (written last).

A build writes into ``OUT.partial`` and renames it to ``OUT`` when complete. Embeddings are
computed in shards of ``shard_size`` chunks, each written atomically under ``shards/``; a build
that is interrupted and rerun with the same settings resumes after the last finished shard and
produces the same bytes as an uninterrupted one (for ``flat`` and ``ivfpq``; ``hnsw``'s graph
depends on the order in which faiss's threads insert, unless it runs with threads=1).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from lmkit.errors import ConfigError, DataError
from lmkit_retrieval.index import IndexSpec, build_index, faiss_module, search_params
from lmkit_retrieval.keys import KEY_MODES, fit_key_transform, key_parts, to_keys

FORMAT = 2  # 2: keys.npy (format-1 stores indexed raw, often collapsed, embeddings)
MANIFEST = "manifest.json"
ARRAYS = ("chunks.npy", "docs.npy", "embeddings.npy", "keys.npy")
INDEX_FILE = "index.faiss"


def document_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """int64 [N]: the document of each token of a packed stream (an ``<eos>`` belongs to the document it ends)."""
    is_eos = np.asarray(tokens) == eos_id
    return np.cumsum(is_eos, dtype=np.int64) - is_eos


def chunk_rows(tokens: np.ndarray, chunk_len: int, pad_id: int) -> np.ndarray:
    """[n+1, chunk_len]: the stream's n whole chunks, then its tail padded with ``pad_id`` (the last continuation)."""
    tokens = np.asarray(tokens)
    n = len(tokens) // chunk_len
    rows = np.full((n + 1, chunk_len), pad_id, dtype=tokens.dtype)
    rows[:n] = tokens[: n * chunk_len].reshape(n, chunk_len)
    tail = tokens[n * chunk_len:]
    rows[n, :len(tail)] = tail
    return rows


def value_spans(doc_ids: np.ndarray, chunk_len: int, n: int) -> np.ndarray:
    """int64 [n, 2]: first and last document of each chunk's value (the chunk and its continuation)."""
    starts = np.arange(n, dtype=np.int64) * chunk_len
    ends = np.minimum(starts + 2 * chunk_len, len(doc_ids)) - 1
    return np.stack([doc_ids[starts], doc_ids[ends]], axis=1).astype(np.int64)


def max_chunks_per_document(spans: np.ndarray) -> int:
    """The largest number of chunks whose values overlap one document."""
    if len(spans) == 0:
        return 0
    first, last = spans[:, 0], spans[:, 1]
    base = int(first.min())
    diff = np.zeros(int(last.max()) - base + 2, dtype=np.int64)
    np.add.at(diff, first - base, 1)
    np.add.at(diff, last - base + 1, -1)
    return int(np.cumsum(diff).max())


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def partial_dir(out_dir) -> Path:
    """Where a build of ``out_dir`` writes until it is complete."""
    out = Path(out_dir)
    return out.with_name(out.name + ".partial")


def build_store(out_dir, tokens: np.ndarray, encoder, *, chunk_len: int = 64, index: IndexSpec | None = None,
                doc_ids: np.ndarray | None = None, shard_size: int = 4096, batch_size: int = 64,
                keys: str = "center", data: dict | None = None, force: bool = False, progress=None) -> "Datastore":
    """Build a store of ``tokens`` (a packed stream, 1-D) at ``out_dir`` with ``encoder``
    (:class:`lmkit_retrieval.encoder.ChunkEncoder`) and open it.

    ``doc_ids`` [N] (default :func:`document_ids` from the tokenizer's ``<eos>``) must be
    non-decreasing; ``keys``: center | whiten | raw (:mod:`lmkit_retrieval.keys`); ``data``: a description
    recorded in the manifest; ``force``: replace an existing store; ``progress(n_chunks)``: called after each
    embedded batch.
    """
    from lmkit.config.checks import check_choice, check_int

    out = Path(out_dir)
    spec = (index or IndexSpec()).check()
    check_int("chunk_len", chunk_len, minimum=1)
    check_int("shard_size", shard_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_choice("keys", keys, KEY_MODES)
    encoder.check_length(chunk_len)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"the token stream must be 1-D, got shape {tokens.shape}")
    n = len(tokens) // chunk_len
    if n == 0:
        raise DataError(f"the token stream has {len(tokens)} tokens, fewer than one chunk (chunk_len={chunk_len})")
    tok = encoder.tokenizer
    docs = document_ids(tokens, tok.eos_id) if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
    if docs.shape != tokens.shape or (len(docs) > 1 and np.any(np.diff(docs) < 0)):
        raise DataError(f"doc_ids must be a non-decreasing array of {len(tokens)} ids (one per token)")
    if out.exists() and not force:
        raise ConfigError(f"'{out}' already exists; choose another directory or pass force=true to replace it")
    spec = spec.resolved(n, encoder.d)
    rows = chunk_rows(tokens, chunk_len, tok.pad_id)
    spans = value_spans(docs, chunk_len, n)
    build = {"format": FORMAT, "chunk_len": chunk_len, "n_chunks": n, "n_tokens": int(len(tokens)), "d": encoder.d,
             "encoder": {"path": encoder.path, "fingerprint": encoder.fingerprint},
             "tokenizer": {"name": type(tok).__name__, "fingerprint": tok.fingerprint()},
             "stream_sha256": _sha256(rows), "docs_sha256": _sha256(spans), "shard_size": shard_size,
             "batch_size": batch_size, "keys": keys, "index": spec.as_dict()}
    work = partial_dir(out)
    manifest_path = work / MANIFEST
    if work.exists():
        try:
            previous = json.loads(manifest_path.read_text()).get("build")
        except (OSError, ValueError):
            previous = None
        if previous != build:  # another build's leftovers: nothing of it can be reused
            shutil.rmtree(work)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    manifest = {"build": build, "complete": False, "data": data or {}, "pad_id": int(tok.pad_id),
                "eos_id": int(tok.eos_id), "max_doc_chunks": max_chunks_per_document(spans)}
    _write_json_atomic(manifest_path, manifest)
    _save_atomic(work / "chunks.npy", rows)
    _save_atomic(work / "docs.npy", spans)
    _embed_shards(work / "shards", rows[:n], encoder, shard_size, batch_size, progress)
    _join_shards(work / "shards", work / "embeddings.npy", n, encoder.d, shard_size)
    faiss = faiss_module()
    embeddings = np.load(work / "embeddings.npy", mmap_mode="r")
    transform = fit_key_transform(embeddings, keys)
    _save_atomic(work / "keys.npy", transform)
    mean, w = key_parts(transform)
    tmp_index = work / f".{INDEX_FILE}.tmp{os.getpid()}"
    faiss.write_index(build_index(embeddings, spec, lambda block: to_keys(block, mean, w)), str(tmp_index))
    os.replace(tmp_index, work / INDEX_FILE)
    shutil.rmtree(work / "shards")
    manifest["files"] = {name: (work / name).stat().st_size for name in (*ARRAYS, INDEX_FILE)}
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return Datastore.open(out)


def _shard_path(shards: Path, s: int) -> Path:
    return shards / f"embeddings-{s:06d}.npy"


def _embed_shards(shards: Path, chunks: np.ndarray, encoder, shard_size: int, batch_size: int, progress) -> None:
    """Embed ``chunks`` shard by shard, skipping the shards a previous run finished."""
    n = len(chunks)
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        path = _shard_path(shards, s)
        if _valid_shard(path, stop - start, encoder.d):
            if progress:
                progress(stop - start)
            continue
        out = np.empty((stop - start, encoder.d), dtype=np.float32)
        for b in range(start, stop, batch_size):
            e = min(b + batch_size, stop)
            out[b - start:e - start] = encoder.embed(chunks[b:e])
            if progress:
                progress(e - b)
        _save_atomic(path, out)


def _valid_shard(path: Path, rows: int, d: int) -> bool:
    try:
        shard = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return shard.shape == (rows, d) and shard.dtype == np.float32


def _join_shards(shards: Path, path: Path, n: int, d: int, shard_size: int) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
    for s, start in enumerate(range(0, n, shard_size)):
        joined[start:start + shard_size] = np.load(_shard_path(shards, s), mmap_mode="r")
    joined.flush()
    del joined
    os.replace(tmp, path)


class Datastore:
    """An opened, complete retrieval store (see the module docstring); arrays are memory-mapped.

    ``Datastore.open(path)`` refuses (one :class:`~lmkit.errors.DataError` line) a directory
    that is missing, incomplete, truncated or unreadable. Search with :meth:`search`, read
    values with :meth:`neighbours`, and check a caller's tokenizer/encoder with
    :meth:`check_compatible` before mixing its ids or embeddings with the store's.
    """

    def __init__(self, path: Path, manifest: dict, chunks, docs, embeddings, index, key_transform):
        self.path, self.manifest = path, manifest
        self.chunks, self.docs, self.embeddings, self.index = chunks, docs, embeddings, index
        self.key_transform = np.array(key_transform, dtype=np.float32)
        self._key_mean, self._key_w = key_parts(self.key_transform)
        build = manifest["build"]
        self.key_mode = build["keys"]
        self.chunk_len, self.n_chunks, self.d = build["chunk_len"], build["n_chunks"], build["d"]
        self.spec = IndexSpec.from_dict(build["index"])
        self.max_doc_chunks = int(manifest["max_doc_chunks"])
        self.encoder_path = build["encoder"]["path"]
        self.encoder_fingerprint = build["encoder"]["fingerprint"]
        self.tokenizer_fingerprint = build["tokenizer"]["fingerprint"]

    build = staticmethod(build_store)

    @classmethod
    def open(cls, path) -> "Datastore":
        p = Path(path)
        what = f"retrieval store '{p}'"
        if not p.is_dir():
            hint = (f"; an interrupted build is in '{partial_dir(p)}': rerun the same build command to resume it"
                    if partial_dir(p).is_dir()
                    else "; build one with python -m lmkit retrieval build OUT_DIR encoder=...")
            raise DataError(f"{what} does not exist{hint}")
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except FileNotFoundError:
            raise DataError(f"'{p}' is not a retrieval store: it has no {MANIFEST}") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{what}: {MANIFEST} is unreadable ({e}); rebuild the store") from None
        if not isinstance(manifest, dict) or manifest.get("complete") is not True:
            raise DataError(f"{what} is incomplete ({MANIFEST} lacks complete=true: its build did not finish); "
                            f"rerun the build command to resume or rebuild it")
        try:
            build, files = manifest["build"], manifest["files"]
            n, length, d = build["n_chunks"], build["chunk_len"], build["d"]
            if build.get("format") != FORMAT:
                raise DataError(f"{what} has format {build.get('format')}, this lmkit-retrieval reads format "
                                f"{FORMAT}; rebuild the store")
        except (KeyError, TypeError):
            raise DataError(f"{what}: {MANIFEST} lacks the build settings; rebuild the store") from None
        for name in (*ARRAYS, INDEX_FILE):
            f = p / name
            if not f.is_file():
                raise DataError(f"{what} is missing {name}; rebuild the store")
            size = f.stat().st_size
            if size != files.get(name):
                raise DataError(f"{what}: {name} has {size} bytes, the manifest records {files.get(name)} "
                                f"(truncated or replaced); rebuild the store")
        expected = {"chunks.npy": (n + 1, length), "docs.npy": (n, 2), "embeddings.npy": (n, d),
                    "keys.npy": (d + 1, d)}
        arrays = {}
        for name, shape in expected.items():
            try:
                arrays[name] = np.load(p / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{what}: {name} is unreadable ({e}); rebuild the store") from None
            if arrays[name].shape != shape:
                raise DataError(f"{what}: {name} has shape {arrays[name].shape}, expected {shape}; rebuild the store")
        faiss = faiss_module()
        try:
            index = faiss.read_index(str(p / INDEX_FILE))
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
            raise DataError(f"{what}: {INDEX_FILE} is unreadable ({first}); rebuild the store") from None
        if index.ntotal != n or index.d != d:
            raise DataError(f"{what}: {INDEX_FILE} holds {index.ntotal} vectors of size {index.d}, expected {n} of "
                            f"size {d}; rebuild the store")
        docs = np.array(arrays["docs.npy"])  # small (16 bytes a chunk), read on every filtered search
        return cls(p, manifest, arrays["chunks.npy"], docs, arrays["embeddings.npy"], index, arrays["keys.npy"])

    def __len__(self) -> int:
        return self.n_chunks

    def check_compatible(self, tokenizer, encoder_fingerprint: str | None = None) -> None:
        """Refuse (ConfigError) a caller whose tokenizer (a Tokenizer or its ``fingerprint()``) or encoder
        fingerprint differ from the store's: its token ids or embeddings would not mean the same."""
        fp = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint()
        if fp != self.tokenizer_fingerprint:
            name = self.manifest["build"]["tokenizer"]["name"]
            raise ConfigError(f"retrieval store '{self.path}' was built with another tokenizer ({name}, fingerprint "
                              f"{self.tokenizer_fingerprint}) than this model's ({fp}); build a store with this "
                              f"model's tokenizer")
        if encoder_fingerprint is not None and encoder_fingerprint != self.encoder_fingerprint:
            raise ConfigError(f"retrieval store '{self.path}' was embedded by another encoder ({self.encoder_path}, "
                              f"fingerprint {self.encoder_fingerprint[:16]}) than the one given "
                              f"({encoder_fingerprint[:16]}); embed queries with the store's encoder or rebuild it")

    def load_encoder(self, device: str = "cpu"):
        """The store's encoder (from its recorded path), refused when its weights changed since the build."""
        from lmkit_retrieval.encoder import ChunkEncoder

        encoder = ChunkEncoder.load(self.encoder_path, device)
        self.check_compatible(encoder.tokenizer, encoder.fingerprint)
        return encoder

    def _check_k(self, k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        if k > self.n_chunks:
            raise ConfigError(f"k={k} is larger than the retrieval store '{self.path}' ({self.n_chunks} chunks); "
                              f"ask for at most {self.n_chunks}")

    def _raw_search(self, q: np.ndarray, fetch: int):
        params = search_params(self.index, self.spec, fetch)
        scores, ids = self.index.search(q, fetch, params=params) if params is not None else self.index.search(q, fetch)
        return ids, scores

    def keys(self, embeddings) -> np.ndarray:
        """float32 [n, d] unit-length index keys of ``embeddings`` [n, d]: the store's transform, then L2-normalised."""
        return to_keys(embeddings, self._key_mean, self._key_w)

    def search(self, queries, k: int, exclude_docs=None) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk_ids int64 [n, k], scores float32 [n, k])``, best first; scores are cosine similarities of keys.

        ``queries`` [n, d]: embeddings (turned into keys here, :meth:`keys`). ``exclude_docs``: None, int [n]
        (each query's document) or int [n, 2] (an inclusive range of documents, for a query that spans several): no
        chunk whose value overlaps it is returned. Rows are filled with id -1 / score -inf only where
        fewer than k chunks remain (every chunk excluded, or an approximate index found fewer).
        """
        self._check_k(k)
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ConfigError(f"queries must be an array [n, {self.d}] (the store's embedding size), got shape "
                              f"{q.shape}")
        q = self.keys(q)
        if exclude_docs is None:
            ids, scores = self._raw_search(q, k)
            return ids.astype(np.int64), scores.astype(np.float32)
        lo, hi = self._exclusion(exclude_docs, len(q))
        out_ids = np.full((len(q), k), -1, dtype=np.int64)
        out_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        todo = np.arange(len(q))
        fetch = min(self.n_chunks, k + self.max_doc_chunks)
        while todo.size:
            ids, scores = self._raw_search(q[todo], fetch)
            span = self.docs[np.clip(ids, 0, None)]  # [m, fetch, 2]
            overlaps = (span[..., 0] <= hi[todo, None]) & (span[..., 1] >= lo[todo, None])
            keep = (ids >= 0) & ~overlaps
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k kept, in rank order
            kept = np.take_along_axis(keep, order, axis=1)
            done = (keep.sum(1) >= k) | (fetch >= self.n_chunks)
            rows = todo[done]
            out_ids[rows] = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)[done]
            out_scores[rows] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)[done]
            todo = todo[~done]
            fetch = min(self.n_chunks, 2 * fetch)
        return out_ids, out_scores

    @staticmethod
    def _exclusion(exclude_docs, n: int) -> tuple[np.ndarray, np.ndarray]:
        ex = np.asarray(exclude_docs)
        if ex.shape == (n,):
            ex = np.stack([ex, ex], axis=1)
        if ex.shape != (n, 2) or not np.issubdtype(ex.dtype, np.integer):
            raise ConfigError(f"exclude_docs must be integer document ids [{n}] or ranges [{n}, 2], got "
                              f"{ex.dtype}{tuple(ex.shape)}")
        return ex[:, 0].astype(np.int64), ex[:, 1].astype(np.int64)

    def neighbours(self, chunk_ids) -> np.ndarray:
        """int64 [..., 2·chunk_len]: each chunk's tokens and its continuation; an id of -1 gives a row of ``<pad>``."""
        ids = np.asarray(chunk_ids, dtype=np.int64)
        if ids.size and (ids.max() >= self.n_chunks or ids.min() < -1):
            raise ConfigError(f"chunk ids must be in [0, {self.n_chunks}) (or -1 for none), got "
                              f"{int(ids.min())}..{int(ids.max())}")
        safe = np.where(ids < 0, 0, ids)
        values = np.concatenate([self.chunks[safe], self.chunks[safe + 1]], axis=-1).astype(np.int64)
        values[ids < 0] = self.manifest["pad_id"]
        return values
