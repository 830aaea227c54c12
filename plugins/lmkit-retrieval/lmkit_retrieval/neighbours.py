"""Precomputed RETRO neighbours of every chunk of every block a run reads, cached on disk.

A block of the packed stream (``seq_len + 1`` tokens from ``start``; the model reads its first
``seq_len``) is cut into ``l = seq_len / chunk_len`` chunks; chunk ``u`` starts at
``start + u·chunk_len``. Its neighbours are the store's ``k`` nearest chunks to the chunk's own
embedding (the store's encoder, mean-pooled), optionally excluding every chunk whose value
overlaps the query chunk's document(s) (RETRO's training rule against leakage).

The table of one split is int32 ``[n_blocks, l, k]`` (``-1`` = none left), computed once in
batches and saved as ``.npy`` under a name that hashes everything it depends on: the store (its
stream, encoder, key transform and index), the split's tokens, the block layout, ``k`` and the exclusion rule.
A DataLoader worker memory-maps it, so the neighbours of a block are a pure function of the
block's index: resumed runs see the same ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmkit.data.datamodule import tokens_digest
from lmkit.errors import ConfigError
from lmkit_retrieval.store import document_ids

EMBED_BATCH = 256


def store_fingerprint(store) -> str:
    """What a store's search results depend on: its stream, documents, encoder, key transform and index settings."""
    build = store.manifest["build"]
    return json.dumps({"stream": build.get("stream_sha256"), "docs": build.get("docs_sha256"),
                       "encoder": store.encoder_fingerprint, "index": build["index"], "keys": build.get("keys"),
                       "format": build.get("format"),
                       "chunk_len": store.chunk_len, "n": store.n_chunks}, sort_keys=True)


def store_is_prefix_of(store, stream: np.ndarray) -> bool:
    """Whether the store's chunks tile the first ``n·chunk_len`` tokens of ``stream`` (then its document
    numbers, counted from the start of its stream, are ``stream``'s)."""
    n, m = store.n_chunks, store.chunk_len
    if len(stream) < n * m:
        return False
    return bool(np.array_equal(np.asarray(store.chunks[:n]).reshape(-1), np.asarray(stream[: n * m])))


def chunk_starts(n_blocks: int, stride: int, seq_len: int, chunk_len: int) -> np.ndarray:
    """int64 [n_blocks, l]: the stream offset of each chunk of each block (block i starts at i·stride)."""
    l = seq_len // chunk_len
    return np.arange(n_blocks, dtype=np.int64)[:, None] * stride + np.arange(l, dtype=np.int64)[None, :] * chunk_len


def compute_table(store, encoder, stream: np.ndarray, offset: int, n_blocks: int, stride: int, seq_len: int,
                  k: int, doc_ids: np.ndarray | None, batch: int = EMBED_BATCH) -> np.ndarray:
    """int32 [n_blocks, l, k]: the neighbours of the chunks of blocks cut from ``stream[offset:]``.

    ``stream`` is the run's whole packed stream (train split then validation split), ``offset``
    where this split starts in it; ``doc_ids`` (the document of each token of ``stream``, numbered
    as the store numbers its own) enables the exclusion, None disables it.
    """
    m = store.chunk_len
    starts = offset + chunk_starts(n_blocks, stride, seq_len, m).reshape(-1)
    out = np.empty((len(starts), k), dtype=np.int32)
    span = np.arange(m, dtype=np.int64)
    for b in range(0, len(starts), batch):
        s = starts[b:b + batch]
        ids = np.asarray(stream[s[:, None] + span[None, :]], dtype=np.int64)
        exclude = None if doc_ids is None else np.stack([doc_ids[s], doc_ids[s + m - 1]], axis=1)
        found, _ = store.search(encoder.embed(ids), k, exclude_docs=exclude)
        out[b:b + batch] = found
    return out.reshape(n_blocks, seq_len // m, k)


def cached_tables(store, cache_dir: Path, splits: dict[str, tuple[np.ndarray, int, int]], seq_len: int, k: int,
                  exclude_same_document: bool | dict[str, bool], eos_id: int) -> dict[str, str]:
    """``{split: path of its int32 [n_blocks, l, k] table}``, computed where not cached yet.

    ``splits``: ``{name: (tokens, n_blocks, stride)}`` in stream order (train first); their
    concatenation is the run's stream, whose documents the exclusion uses. ``exclude_same_document``:
    one rule for every split, or ``{split: rule}``.
    """
    rules = (exclude_same_document if isinstance(exclude_same_document, dict)
             else {name: exclude_same_document for name in splits})
    stream = np.concatenate([np.asarray(t) for t, _, _ in splits.values()])
    doc_ids = None
    if any(rules.values()):
        if not store_is_prefix_of(store, stream):
            raise ConfigError(f"objective.exclude_same_document=true needs a retrieval store built from this run's "
                              f"corpus (its train split, or all of it: split=train|all with the same data settings), "
                              f"so that its document numbers are the run's; '{store.path}' holds other text. Build the "
                              f"store from this corpus, or set objective.exclude_same_document=false")
        doc_ids = document_ids(stream, eos_id)
    root = Path(cache_dir) / "retro_neighbours"
    root.mkdir(parents=True, exist_ok=True)
    encoder, paths, offset = None, {}, 0
    for name, (tokens, n_blocks, stride) in splits.items():
        key = json.dumps({"store": store_fingerprint(store), "corpus": tokens_digest(stream), "split": name,
                          "offset": offset, "n_blocks": n_blocks, "stride": stride, "seq_len": seq_len,
                          "chunk_len": store.chunk_len, "k": k, "exclude": bool(rules[name])}, sort_keys=True)
        path = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
        if not path.is_file():
            if encoder is None:
                encoder = store.load_encoder()
            table = compute_table(store, encoder, stream, offset, n_blocks, stride, seq_len, k,
                                  doc_ids if rules[name] else None)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, path)
        paths[name] = str(path)
        offset += len(tokens)
    return paths
