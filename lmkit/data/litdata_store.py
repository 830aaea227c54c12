"""Token stores in Lightning's litdata format: written by ``python -m lmkit optimize``, streamed by ``data=litdata``.

A store is a directory (local, or object storage such as ``s3://bucket/corpus`` once copied there)::

    lmkit.json       what wrote it: format, tokenizer (kind, settings, id-mapping fingerprint), token counts
    tokenizer.json   the tokenizer, without sentinels (an objective that needs them adds them on top)
    train/           litdata ``optimize`` output: index.json + chunk-*.bin, 1-D token tensors (TokensLoader)
    val/             the same for the validation split (absent when the store has none)

The tokens are the packed stream of :func:`lmkit.data.cache.load_tokens` (EOS after every document), tokenized
in bounded memory by :mod:`lmkit.data.tokenize_stream` and cut into chunks of ``chunk_tokens``. litdata's
``TokensLoader`` reads blocks that never cross a chunk, so each chunk's last ``chunk_tokens mod block_len``
tokens are not read: one block in ``chunk_tokens / block_len`` at most (0.002% at the 4M-token default and
block 129). A local store is written under a temporary name and renamed when complete, so an interrupted
``optimize`` never leaves a directory that looks like a store.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lmkit.data.sources import Source
from lmkit.errors import DataError

FORMAT = "lmkit-litdata/1"
META_FILE = "lmkit.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
DEFAULT_CHUNK_TOKENS = 1 << 22


def is_remote(path: str) -> bool:
    """An object-storage address (``s3://``, ``gs://``, ...), read through litdata's downloaders."""
    return "://" in str(path) and not str(path).startswith("file://")


def _local(path: str) -> str:
    return str(path)[len("file://"):] if str(path).startswith("file://") else os.path.expanduser(str(path))


# -- writing ----------------------------------------------------------------------------
def _chunk_items(span):
    """litdata ``optimize`` worker: the tokens ``[start, end)`` of a cache file as one 1-D tensor."""
    import torch

    path, start, end, dtype = span
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    yield torch.from_numpy(np.array(tokens[start:end], dtype=dtype))  # a copy: writable, contiguous


def _spans(path: Path, start: int, end: int, chunk_tokens: int, dtype: str) -> list[tuple]:
    return [(str(path), s, min(s + chunk_tokens, end), dtype) for s in range(start, end, chunk_tokens)]


@contextmanager
def _new_store(out_dir, overwrite: bool):
    """A temporary directory beside ``out_dir`` to write a store into; renamed to ``out_dir`` when the block ends
    without an error (replacing an existing store only with ``overwrite``), else removed."""
    if is_remote(out_dir):
        raise DataError(f"optimize writes a local directory, not '{out_dir}': write it locally, then copy it to "
                        f"object storage (e.g. aws s3 sync DIR {out_dir}) and train with data.path={out_dir}")
    out = Path(_local(out_dir)).absolute()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise DataError(f"'{out}' already exists: choose another directory, or pass --force to replace "
                            f"{'the store' if (out / META_FILE).is_file() else 'it'}")
        if not (out / META_FILE).is_file():
            raise DataError(f"'{out}' exists and is not an lmkit store (no {META_FILE}): --force replaces "
                            f"only a store. Choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the store after the rename
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_store(out_dir, splits: dict[str, tuple[Path, int, int]], tokenizer, info: dict, *,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS, workers: int = 1, overwrite: bool = False) -> dict:
    """Write a store from token cache files: ``splits[name] = (cache .npy file, start, end)``.

    ``info`` (source, settings, digests) goes into lmkit.json next to the format and the tokenizer. The
    store appears at ``out_dir`` only when complete; an existing one is replaced only with ``overwrite``.
    """
    import litdata

    from lmkit.data.cache import token_dtype

    dtype = np.dtype(token_dtype(tokenizer.vocab_size)).name
    with _new_store(out_dir, overwrite) as tmp:
        counts = {}
        for name, (path, start, end) in splits.items():
            if end <= start:
                continue
            spans = _spans(path, start, end, chunk_tokens, dtype)
            litdata.optimize(fn=_chunk_items, inputs=spans, output_dir=str(tmp / name), chunk_size=chunk_tokens,
                             item_loader=litdata.TokensLoader(), num_workers=max(1, min(workers, len(spans))),
                             mode="overwrite", verbose=False, start_method="fork",
                             keep_data_ordered=True)  # static slices per worker: the same store every time
            counts[name] = end - start
        tokenizer.save(tmp / TOKENIZER_FILE)
        meta = {"format": FORMAT, "tokenizer": {**info.pop("tokenizer"), "fingerprint": text_fingerprint(tokenizer)},
                "dtype": dtype, "chunk_tokens": chunk_tokens, "tokens": counts, **info}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def merge_stores(out_dir, parts: list[str], *, overwrite: bool = False) -> dict:
    """One store from the parts ``optimize --part R/N`` wrote on N machines: every part of one corpus and one
    tokenizer, each rank once; chunks concatenated in rank order (litdata's merge_datasets), per split."""
    import contextlib
    import hashlib
    import io

    import litdata

    stores = [LitdataStore(p) for p in parts]
    first = stores[0].meta
    for store in stores:
        meta = store.meta
        if "part" not in meta:
            raise DataError(f"'{store.path}' is a whole store, not a part written by optimize --part R/N")
        if meta["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"] or meta["dtype"] != first["dtype"]:
            raise DataError(f"parts '{stores[0].path}' and '{store.path}' were written by different tokenizers: "
                            f"write every part with the same tokenizer settings")
        if meta["part"]["corpus"] != first["part"]["corpus"]:
            raise DataError(f"parts '{stores[0].path}' and '{store.path}' were written from different corpora or "
                            f"settings (data.path, its files, data.val_fraction): write every part from the same ones")
    count = first["part"]["count"]
    ranks = sorted(store.meta["part"]["rank"] for store in stores)
    if ranks != list(range(count)) or any(s.meta["part"]["count"] != count for s in stores):
        raise DataError(f"merging needs the {count} parts of the corpus, ranks 0..{count - 1}, each once; got ranks "
                        f"{ranks}")
    stores.sort(key=lambda s: s.meta["part"]["rank"])
    with _new_store(out_dir, overwrite) as tmp:
        counts, digests = {}, {}
        for split in SPLITS:
            dirs = [s.split_dir(split) for s in stores if split in s.indexes]
            if not dirs:
                continue
            with contextlib.redirect_stderr(io.StringIO()):  # litdata's progress bar
                litdata.merge_datasets(dirs, str(tmp / split))
            counts[split] = sum(s.meta["tokens"].get(split, 0) for s in stores)
            joined = "; ".join(str(s.meta["digests"].get(split)) for s in stores)
            digests[split] = f"{counts[split]} tokens, merged sha256 {hashlib.sha256(joined.encode()).hexdigest()[:16]}"
        shutil.copyfile(stores[0]._fetch(TOKENIZER_FILE), tmp / TOKENIZER_FILE)
        meta = {**{k: v for k, v in first.items() if k != "part"}, "tokens": counts, "digests": digests,
                "merged_parts": count}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# -- reading ----------------------------------------------------------------------------
class LitdataStore(Source):
    """A store as a run's data source (``data=litdata data.path=DIR``): tokens, no text.

    Opening it checks that it is complete: lmkit.json of this format, the tokenizer, each split's
    index.json, and (local stores) every chunk file present at the size its index records.
    """

    def __init__(self, path, cache_dir: str | None = None):
        if path is None or path == "" or isinstance(path, (list, tuple)):
            raise DataError(f"data=litdata needs data.path=DIR, one store written by python -m lmkit optimize DIR "
                            f"(got {path!r})")
        self.path = str(path)
        self.remote = is_remote(self.path)
        self.root = self.path.rstrip("/") if self.remote else str(Path(_local(self.path)).absolute())
        self._cache_dir = cache_dir
        self.meta = self._read_meta()
        self.indexes = {name: self._read_index(name) for name in SPLITS if name in self.meta.get("tokens", {})}
        if "train" not in self.indexes:
            raise DataError(f"litdata store '{self.path}' has no training split (train/): write it again with "
                            f"python -m lmkit optimize")

    # files of the store
    def _fetch(self, relative: str) -> Path | None:
        """The local path of a store file (downloaded first for a remote store), or None when it is missing."""
        if not self.remote:
            p = Path(self.root) / relative
            return p if p.is_file() else None
        from litdata.streaming.downloader import get_downloader

        local = Path(self.cache_dir()) / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            get_downloader(self.root, str(local.parent), []).download_file(f"{self.root}/{relative}", str(local))
        except Exception as e:  # no such object, no credentials, no network: the backend's reason, one line
            raise DataError(f"cannot read '{self.root}/{relative}': {(str(e).splitlines() or [type(e).__name__])[0][:200]}. "
                            f"Check data.path and the storage credentials") from None
        return local if local.is_file() else None

    def cache_dir(self) -> str:
        """Where litdata keeps downloaded chunks of a remote store (under data.cache_dir or LMKIT_CACHE)."""
        import hashlib

        from lmkit.data.cache import default_cache_dir

        base = Path(self._cache_dir) if self._cache_dir else default_cache_dir()
        return str(base / "litdata" / hashlib.sha256(self.root.encode()).hexdigest()[:16])

    def _read_meta(self) -> dict:
        if not self.remote:
            root = Path(self.root)
            if not root.exists():
                raise DataError(f"litdata store '{self.path}' does not exist. Write it with python -m lmkit optimize "
                                f"{self.path} data=... (relative paths are taken from {Path.cwd()})")
            if not root.is_dir():
                raise DataError(f"data.path '{self.path}' is a file; data=litdata reads a store directory written by "
                                f"python -m lmkit optimize")
        path = self._fetch(META_FILE)
        if path is None:
            hint = (" (it looks like a bare litdata dataset: lmkit needs the store python -m lmkit optimize writes, "
                    "which records the tokenizer)" if self._fetch("index.json") is not None else "")
            raise DataError(f"'{self.path}' is not an lmkit litdata store: it has no {META_FILE}{hint}. Write it with "
                            f"python -m lmkit optimize {self.path} data=...")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"'{path}' is damaged ({type(e).__name__}); write the store again with python -m lmkit "
                            f"optimize") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"'{path}' is not an lmkit litdata store of format {FORMAT} (found "
                            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}); write it "
                            f"again with this lmkit's python -m lmkit optimize")
        return meta

    def _read_index(self, split: str) -> dict:
        path = self._fetch(f"{split}/index.json")
        if path is None:
            raise DataError(f"litdata store '{self.path}' is incomplete: {split}/index.json is missing. Write the "
                            f"store again with python -m lmkit optimize")
        try:
            index = json.loads(path.read_text())
            chunks = index["chunks"]
            assert index["config"]["item_loader"] == "TokensLoader"
        except Exception:
            raise DataError(f"'{path}' is not a litdata token index (damaged, or written by another tool); write the "
                            f"store again with python -m lmkit optimize") from None
        if not self.remote:
            for chunk in chunks:
                f = Path(self.root) / split / chunk["filename"]
                if not f.is_file():
                    raise DataError(f"litdata store '{self.path}' is missing the shard {split}/{chunk['filename']}. "
                                    f"Restore it, or write the store again with python -m lmkit optimize")
                if f.stat().st_size != chunk["chunk_bytes"]:
                    raise DataError(f"shard {split}/{chunk['filename']} of litdata store '{self.path}' is truncated "
                                    f"or damaged ({f.stat().st_size} bytes, its index says {chunk['chunk_bytes']}). "
                                    f"Restore it, or write the store again with python -m lmkit optimize")
        return index

    def split_dir(self, split: str) -> str:
        return f"{self.root}/{split}" if self.remote else str(Path(self.root) / split)

    def blocks(self, split: str, block_len: int) -> int:
        """Blocks of ``block_len`` tokens litdata's TokensLoader reads from a split (none cross a chunk)."""
        return sum(chunk["dim"] // block_len for chunk in self.indexes.get(split, {}).get("chunks", []))

    @property
    def has_validation(self) -> bool:
        return "val" in self.indexes

    def split_tokens(self, split: str) -> np.ndarray:
        """Every token of a split (``train``, ``val``, or ``all`` = both), chunk after chunk in index order.

        Reads the chunk files directly (memory-mapped): a TokensLoader chunk of one item is a header of
        ``4 · (items + 2)`` bytes (item count and offsets) followed by the tokens. Local stores only.
        """
        if self.remote:
            raise DataError(f"reading all tokens of a remote store ('{self.path}') is not supported: copy it locally "
                            f"(e.g. aws s3 sync) and pass that directory")
        parts = []
        for name in (SPLITS if split == "all" else (split,)):
            if name not in self.indexes:
                if split == "all":
                    continue
                raise DataError(f"litdata store '{self.path}' has no {name} split")
            for chunk in self.indexes[name]["chunks"]:
                header = 4 * (int(chunk["chunk_size"]) + 2)
                parts.append(np.memmap(Path(self.root) / name / chunk["filename"], dtype=self.meta["dtype"], mode="r",
                                       offset=header, shape=(int(chunk["dim"]),)))
        return np.concatenate(parts)

    # a Source: identity, tokenizer, no text
    def fingerprint(self) -> str:
        return f"litdata:{self.meta.get('digests', {}).get('train')}:{self.meta['tokenizer']['fingerprint']}"

    def documents(self):
        raise DataError(f"litdata store '{self.path}' holds tokens, not text: nothing here reads its documents "
                        f"(train a tokenizer or read the text from the corpus the store was written from)")

    def tokenizer_for(self, cfg):
        """The store's tokenizer with the sentinels ``cfg`` asks for; a DataError when ``cfg`` names another."""
        from lmkit.tokenizers.trained import load_tokenizer_file

        saved = self.meta["tokenizer"]
        trained = saved["name"] != "byte"
        if cfg.name != saved["name"] or (trained and int(cfg.vocab_size) != int(saved["vocab_size"])):
            theirs = f"tokenizer={saved['name']}" + (f" tokenizer.vocab_size={saved['vocab_size']}" if trained else "")
            ours = f"tokenizer={cfg.name}" + (f" tokenizer.vocab_size={cfg.vocab_size}" if cfg.name != "byte" else "")
            raise DataError(f"litdata store '{self.path}' was written with {theirs}, but this run asks for {ours}: "
                            f"train with {theirs}, or write a store with this tokenizer (python -m lmkit optimize)")
        path = self._fetch(TOKENIZER_FILE)
        try:
            base = load_tokenizer_file(path)
        except Exception:
            base = None
        if base is None or text_fingerprint(base) != saved["fingerprint"]:
            raise DataError(f"the tokenizer of litdata store '{self.path}' ({TOKENIZER_FILE}) is missing or does not "
                            f"match its {META_FILE}; write the store again with python -m lmkit optimize")
        return with_sentinels(base, cfg.num_sentinels)

    def check_tokenizer(self, tokenizer) -> None:
        """A DataError unless ``tokenizer`` maps text to the ids the store holds (sentinels aside)."""
        saved = self.meta["tokenizer"]
        if text_fingerprint(tokenizer) != saved["fingerprint"]:
            raise DataError(f"litdata store '{self.path}' was written by another tokenizer ({saved['name']}, "
                            f"fingerprint {saved['fingerprint']}) than this run's: use the store's tokenizer, or write "
                            f"a store with this one (python -m lmkit optimize)")


def text_fingerprint(tokenizer) -> str:
    """The fingerprint of ``tokenizer``'s id mapping without its sentinels (which sit on top of the vocabulary and
    never occur in tokenized text): what a store records and a run's tokenizer must match."""
    import hashlib

    from lmkit.tokenizers.byte import ByteTokenizer
    from lmkit.tokenizers.trained import TrainedTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer(num_sentinels=0).fingerprint()
    if isinstance(tokenizer, TrainedTokenizer):
        vocab = sorted((i, t) for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()
                       if not t.startswith("<extra_id_"))
        return hashlib.sha256(f"{tokenizer.kind}:{vocab}".encode()).hexdigest()[:16]
    return tokenizer.fingerprint()


def with_sentinels(tokenizer, n: int):
    """A tokenizer loaded from a store (no sentinels) with ``n`` sentinels on top of its vocabulary."""
    from lmkit.tokenizers.byte import ByteTokenizer
    from lmkit.tokenizers.trained import TrainedTokenizer

    if n == 0:
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer(num_sentinels=n)
    if isinstance(tokenizer, TrainedTokenizer):
        return TrainedTokenizer(tokenizer.hf, tokenizer.kind, n)
    raise DataError(f"the store's tokenizer ({type(tokenizer).__name__}) cannot take sentinels; use an objective "
                    f"without them")


def check_run(data, objective_component) -> None:
    """What data=litdata cannot combine with (called by lmkit.config.validate before anything is built)."""
    from lmkit.errors import ConfigError

    if data.source != "litdata":
        return
    from lmkit.config.checks import serves_own_records

    if serves_own_records(objective_component):
        raise ConfigError(f"data=litdata streams packed token blocks; objective '{objective_component.name}' reads its "
                          f"own records or rows. Use data=jsonl/text for it")
    for key, value, why in (
            ("data.val_path", data.val_path, "the store holds its validation split: pass data.val_path to "
                                             "python -m lmkit optimize"),
            ("data.seq_len_schedule", data.seq_len_schedule, "litdata's loader reads blocks of one length"),
            ("data.batch_ramp_steps", data.batch_ramp_steps, "litdata's loader serves batches of one size")):
        if value:
            raise ConfigError(f"{key} cannot be combined with data=litdata ({why}); set {key}="
                              f"{0 if key == 'data.batch_ramp_steps' else 'null'}")
