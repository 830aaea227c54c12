"""Token cache: a corpus tokenized once into a memory-mapped array of ids.

The cache is keyed by the corpus and tokenizer fingerprints, written to a temporary name
and renamed (a killed run never leaves a half-written cache), and loaded with
``allow_pickle=False`` so a planted file cannot execute code.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lmkit.data.sources import Source
from lmkit.errors import DataError
from lmkit.tokenizers.base import Tokenizer

_CHUNK_DOCS = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMKIT_CACHE", Path.home() / ".cache" / "lmkit"))


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _encode_chunk(tokenizer: Tokenizer, docs: list[str], eos: int, dtype) -> np.ndarray:
    fast = getattr(tokenizer, "encode_array", None)
    parts = []
    encoded = [fast(d) for d in docs] if fast else tokenizer.encode_batch(docs)
    eos_arr = np.array([eos], dtype=dtype)
    for ids in encoded:
        parts.append(np.asarray(ids, dtype=dtype))
        parts.append(eos_arr)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_token_array(source: Source, tokenizer: Tokenizer) -> np.ndarray:
    """All documents of ``source`` tokenized and packed, EOS after each document.

    A source with a ``token_array(tokenizer)`` method packs its own rows (:mod:`lmkit.data.sft`).
    """
    own = getattr(source, "token_array", None)
    if own is not None:
        return own(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    chunks, batch = [], []
    for doc in source.documents():
        batch.append(doc)
        if len(batch) == _CHUNK_DOCS:
            chunks.append(_encode_chunk(tokenizer, batch, tokenizer.eos_id, dtype))
            batch = []
    if batch:
        chunks.append(_encode_chunk(tokenizer, batch, tokenizer.eos_id, dtype))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if tokens.size == 0:
        raise DataError("the corpus is empty: no document contains any text. Check data.source / data.path.")
    return tokens


def token_cache_path(source: Source, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Where :func:`load_tokens` keeps the packed tokens of ``source`` (keyed by corpus and tokenizer)."""
    key = hashlib.sha256(f"{source.fingerprint()}|{tokenizer.fingerprint()}".encode()).hexdigest()[:24]
    return Path(cache_dir) / "tokens" / f"{key}.npy"


def load_tokens(source: Source, tokenizer: Tokenizer, cache_dir: Path) -> np.ndarray:
    """The packed token array of ``source``, from the cache when present (memory-mapped)."""
    path = token_cache_path(source, tokenizer, cache_dir)
    if path.exists():
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            if tokens.ndim == 1 and tokens.dtype == token_dtype(tokenizer.vocab_size) and tokens.size > 0:
                return tokens
            raise ValueError(f"unexpected array {tokens.dtype}{tokens.shape}")
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"lmkit: token cache {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    if getattr(source, "token_array", None) is None:  # streamed in bounded memory, one shard per file
        from lmkit.data.tokenize_stream import build_token_cache

        with cache_writes(path.parent):
            return build_token_cache(source, tokenizer, path)
    tokens = build_token_array(source, tokenizer)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    with cache_writes(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            np.save(tmp, tokens, allow_pickle=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r", allow_pickle=False)


@contextmanager
def cache_writes(directory: Path):
    """Writing under the cache directory: an OS error (a file in the way, no permission, disk full) becomes
    one DataError naming the directory and how to choose another."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise DataError(f"cannot write the cache under '{directory}': {e.strerror or e}{where}. Set data.cache_dir "
                        f"(or the LMKIT_CACHE environment variable) to a writable directory.") from None
