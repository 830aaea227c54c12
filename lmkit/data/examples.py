"""Example-based data: one labelled example per record, padded per micro-batch (classification).

Pretraining data is a packed token stream cut into windows (:mod:`lmkit.data.datamodule`); a
task such as classification has one example per record instead. This module reads the records
(jsonl, csv or tsv; field names configurable; errors name ``file:line``), tokenizes them once
into a cache keyed like the token cache (files, fields and tokenizer fingerprints; written to a
temporary name and renamed; loaded with ``allow_pickle=False``), maps the labels, splits the
examples (the last ``data.val_fraction`` is validation) and serves them through the same step
sampler as pretraining (:class:`lmkit.data.sampler.StepBatchSampler` over example indices),
so a resumed run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from lmkit.data.cache import cache_writes, token_dtype
from lmkit.data.datamodule import _SEED_STRIDE, LMDataModule, StepCollate
from lmkit.data.sources import _paths, _read_text, files_fingerprint, jsonl_records
from lmkit.errors import ConfigError, DataError

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_CACHE_VERSION = "examples-v1"


@dataclass(frozen=True)
class RecordFields:
    """Names of the fields (jsonl keys, csv columns) that hold the text, the optional second text and the label."""

    text: str = "text"
    text_pair: str = "text_pair"
    label: str = "label"


@dataclass
class Record:
    text: str
    pair: str | None
    label: str
    file: int  # index into the list of files
    line: int  # 1-based line of the record in its file


# -- reading ----------------------------------------------------------------------------------------
def _rows(path: Path):
    """(line number, dict) of every record of a jsonl/csv/tsv file."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"'{path}': example files must be jsonl, csv or tsv ({', '.join(SUFFIXES)}), "
                        f"got '{path.suffix or path.name}'. Check data.path.")
    if kind == "json":
        yield from jsonl_records(path, "named fields")
        return
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    for row in reader:
        yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _field(row: dict, name: str):
    value = row.get(name)
    return None if value is None or value == "" else value


def _fields_of(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"


def read_records(files: list[Path], fields: RecordFields) -> list[Record]:
    """Every record of ``files``; a record without the text or label field is one DataError naming file:line."""
    records = []
    for fi, path in enumerate(files):
        for n, row in _rows(path):
            text, label = _field(row, fields.text), _field(row, fields.label)
            if text is None:
                raise DataError(f"{path}:{n}: the record has no text field '{fields.text}' (its fields: {_fields_of(row)}). "
                                f"Set objective.text_field to the field holding the text.")
            if label is None:
                raise DataError(f"{path}:{n}: the record has no label field '{fields.label}' (its fields: {_fields_of(row)}). "
                                f"Give every record a label, or set objective.label_field to the field holding it.")
            pair = _field(row, fields.text_pair)
            records.append(Record(str(text), None if pair is None else str(pair), str(label), fi, n))
    if not records:
        raise DataError(f"no records in {', '.join(map(str, files))}. Check data.path.")
    return records


# -- the token cache --------------------------------------------------------------------------------
class Examples:
    """Tokenized records: each text's ids (and its pair's, when it has one), the raw label and where it came from."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.a = arrays
        self.files = [str(f) for f in arrays["files"]]

    def __len__(self) -> int:
        return len(self.a["labels"])

    def text(self, i: int) -> np.ndarray:
        off = self.a["text_off"]
        return self.a["text_ids"][off[i]:off[i + 1]]

    def pair(self, i: int) -> np.ndarray | None:
        if not self.a["has_pair"][i]:
            return None
        off = self.a["pair_off"]
        return self.a["pair_ids"][off[i]:off[i + 1]]

    def label(self, i: int) -> str:
        return str(self.a["labels"][i])

    def where(self, i: int) -> str:
        return f"{self.files[self.a['file_idx'][i]]}:{self.a['line'][i]}"

    def digest(self, indices: np.ndarray) -> str:
        """Hash of the token ids of ``indices`` (in order): identifies a split's content, not its location."""
        h = hashlib.sha256(str(len(indices)).encode())
        for i in indices:
            h.update(np.asarray(self.text(i), dtype=np.int64).tobytes() + b"|")
            p = self.pair(i)
            h.update(b"-" if p is None else np.asarray(p, dtype=np.int64).tobytes())
            h.update(b"|" + self.label(i).encode() + b"\n")
        return h.hexdigest()[:16]


def _encode(texts: list[str], tokenizer, dtype) -> tuple[np.ndarray, np.ndarray]:
    ids = tokenizer.encode_batch(texts) if texts else []
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(off[-1]))
    return flat, off


def build_examples(files: list[Path], fields: RecordFields, tokenizer) -> dict[str, np.ndarray]:
    records = read_records(files, fields)
    dtype = token_dtype(tokenizer.vocab_size)
    text_ids, text_off = _encode([r.text for r in records], tokenizer, dtype)
    has_pair = np.array([r.pair is not None for r in records], dtype=bool)
    pair_ids, pair_off = _encode([r.pair or "" for r in records], tokenizer, dtype)
    return {"text_ids": text_ids, "text_off": text_off, "pair_ids": pair_ids, "pair_off": pair_off,
            "has_pair": has_pair, "labels": np.array([r.label for r in records], dtype=str),
            "file_idx": np.array([r.file for r in records], dtype=np.int32),
            "line": np.array([r.line for r in records], dtype=np.int64),
            "files": np.array([str(f) for f in files], dtype=str)}


def load_examples(files: list[Path], fields: RecordFields, tokenizer, cache_dir: Path) -> Examples:
    """The tokenized records of ``files``, from the cache when present."""
    key = hashlib.sha256(f"{_CACHE_VERSION}|{files_fingerprint(files)}|{fields}|{tokenizer.fingerprint()}".encode())
    path = Path(cache_dir) / "examples" / f"{key.hexdigest()[:24]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if len(arrays["labels"]) > 0 and arrays["text_off"][-1] == len(arrays["text_ids"]):
                return Examples(arrays)
            raise ValueError("inconsistent arrays")
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"lmkit: example cache {path} is unreadable ({e}); rebuilding it", stacklevel=2)
    arrays = build_examples(files, fields, tokenizer)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    with cache_writes(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return Examples(arrays)


# -- labels -----------------------------------------------------------------------------------------
def _label_order(label: str):
    try:
        return (0, float(label), label)  # numeric labels (0, 1, 2) in numeric order
    except ValueError:
        return (1, 0.0, label)


def resolve_labels(ex: Examples, train: np.ndarray, configured: list | None) -> list[str]:
    """The classes: ``configured`` as given, else the training split's labels, sorted (numbers numerically)."""
    if configured:
        labels = [str(x) for x in configured]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"objective.labels lists {', '.join(map(repr, dup))} more than once")
        return labels
    return sorted({ex.label(i) for i in train}, key=_label_order)


def class_targets(ex: Examples, labels: list[str], configured: bool) -> np.ndarray:
    """Each example's class index; a label outside ``labels`` is one DataError naming file:line and the classes."""
    index = {name: i for i, name in enumerate(labels)}
    out = np.empty(len(ex), dtype=np.int64)
    for i in range(len(ex)):
        c = index.get(ex.label(i))
        if c is None:
            shown = ", ".join(labels[:20]) + (f" (and {len(labels) - 20} more)" if len(labels) > 20 else "")
            source = "objective.labels" if configured else "the training split's labels"
            raise DataError(f"{ex.where(i)}: label {ex.label(i)!r} is not one of the classes ({shown}; from {source}). "
                            f"Fix the record, or list every class in objective.labels=[...].")
        out[i] = c
    return out


def regression_targets(ex: Examples) -> np.ndarray:
    out = np.empty(len(ex), dtype=np.float32)
    for i in range(len(ex)):
        try:
            out[i] = float(ex.label(i))
        except ValueError:
            raise DataError(f"{ex.where(i)}: label {ex.label(i)!r} is not a number; regression "
                            f"(objective.regression=true or num_labels=1) needs a numeric label.") from None
    return out


# -- serving ----------------------------------------------------------------------------------------
class ExampleDataset(Dataset):
    """Examples ``indices`` of ``ex`` as ``((text ids, pair ids or None, target), stream position)``."""

    def __init__(self, ex: Examples, indices: np.ndarray, targets: np.ndarray):
        self.ex, self.indices, self.targets = ex, indices, targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        index, position = key
        i = int(self.indices[index])
        return (self.ex.text(i), self.ex.pair(i), self.targets[i].item()), position


class ExampleCollate(StepCollate):
    """:class:`StepCollate` for examples of different lengths: the collator gets a list and pads."""

    def __call__(self, items):
        micro = []
        for m in range(0, len(items), self.mbs):
            gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + items[m][1])
            micro.append(self.collator([ex for ex, _ in items[m:m + self.mbs]], gen))
        return {"micro_batches": micro}


class ExampleValSampler:
    """Validation batches: every example once in order (the last batch may be short), ``max_batches`` at most."""

    def __init__(self, n_items: int, batch_size: int, max_batches: int | None, rank: int = 0, world_size: int = 1):
        starts = list(range(0, n_items, batch_size))[:max_batches or None]
        self.batches = [list(range(s, min(s + batch_size, n_items))) for s in starts][rank::world_size]

    def __iter__(self):
        for batch in self.batches:
            yield [(i, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class ExampleDataModule(LMDataModule):
    """Serves labelled examples: step batches for training (resume-exact), every example for validation.

    ``files``: the record files; ``objective`` is told the classes (``set_labels``) when the
    data is prepared, before its heads are built, and builds the collator.
    """

    def __init__(self, data_cfg, files: list[Path], fields: RecordFields, tokenizer, objective, seed: int,
                 cache_dir: Path, val_batches: int | None, labels: list | None = None, regression: bool = False,
                 data_steps=lambda: 0):
        L.LightningDataModule.__init__(self)
        self.cfg, self.files, self.fields, self.tokenizer, self.objective = data_cfg, files, fields, tokenizer, objective
        self.seq_len, self.seed, self.cache_dir, self.val_batches = data_cfg.seq_len, seed, cache_dir, val_batches
        self.configured_labels, self.regression, self.data_steps = labels, regression, data_steps
        self.labels: list[str] | None = None
        self.examples: Examples | None = None
        self._collate = None

    @property
    def collate(self) -> ExampleCollate:  # built on first use: the collator needs the heads' kind and the classes
        if self._collate is None:
            self._collate = ExampleCollate(self.objective.make_collator(), self.cfg.batch_size, self.seed)
        return self._collate

    def prepare(self) -> None:
        if self.examples is not None:
            return
        ex = load_examples(self.files, self.fields, self.tokenizer, self.cache_dir)
        n_val = int(len(ex) * self.cfg.val_fraction)
        train, val = np.arange(len(ex) - n_val), np.arange(len(ex) - n_val, len(ex))
        if self.regression:
            targets = regression_targets(ex)
        else:
            self.labels = resolve_labels(ex, train, self.configured_labels)
            targets = class_targets(ex, self.labels, bool(self.configured_labels))
        self.objective.set_labels(self.labels)
        self.examples, self.train_idx = ex, train
        self.train_set = ExampleDataset(ex, train, targets)
        self.val_set = ExampleDataset(ex, val, targets)
        world = self._world()[1]
        need = self.cfg.batch_size * self.cfg.grad_accum * world
        if len(train) < need:
            raise DataError(f"too few examples: the training split has {len(train)}, but one optimizer step needs {need} "
                            f"(batch_size {self.cfg.batch_size} × grad_accum {self.cfg.grad_accum} × {world} ranks). "
                            f"Use more data, or lower data.batch_size.")
        if self.cfg.val_fraction > 0 and n_val == 0:
            raise DataError(f"the validation split is empty: {len(ex)} examples × data.val_fraction={self.cfg.val_fraction} "
                            f"< 1. Raise data.val_fraction or use more data.")

    def fingerprint(self) -> dict:
        """As :meth:`LMDataModule.fingerprint`; ``corpus`` hashes the training examples' tokens and labels and the class list."""
        self.prepare()
        classes = "regression" if self.labels is None else json.dumps(self.labels)
        corpus = f"{len(self.train_idx)} examples, sha256 {self.examples.digest(self.train_idx)}, classes {classes}"
        return {"corpus": corpus, "seed": self.seed, "data.seq_len": self.seq_len,
                "data.val_fraction": self.cfg.val_fraction, "tokenizer": self.tokenizer.fingerprint(),
                "data.path": [os.path.abspath(str(f)) for f in self.files], "fields": list(vars(self.fields).values())}

    def val_dataloader(self):
        rank, world = self._world()
        return self._loader(self.val_set, ExampleValSampler(len(self.val_set), self.cfg.batch_size, self.val_batches,
                                                            rank, world))


def example_files(data_cfg, cache_dir: Path) -> list[Path]:
    """``data.path``'s files, or the built-in speaker task when no path is set."""
    if data_cfg.path in (None, "", []):
        from lmkit.data.speakers import build_speaker_task

        return [build_speaker_task(cache_dir)]
    return _paths(data_cfg.path)
