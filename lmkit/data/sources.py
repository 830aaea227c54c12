"""Document sources: the built-in corpus, text files, jsonl and local HF datasets.

Each source yields documents (strings). Packing inserts EOS between documents.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Iterator

from lmkit.errors import DataError, did_you_mean

BUILTIN_CORPORA = {"tinyshakespeare": Path(__file__).parent / "corpora" / "tinyshakespeare.txt"}
TEXT_SUFFIXES = (".txt", ".text", ".md")


def _paths(path) -> list[Path]:
    """Expand a path or list of paths (files or directories) into sorted files."""
    if path is None or path == "" or path == []:
        raise DataError("data.path is not set: give a file or directory, e.g. data.path=/data/corpus.txt")
    items = [path] if isinstance(path, (str, os.PathLike, int)) else list(path)
    files: list[Path] = []
    for item in items:
        p = Path(os.path.expanduser(str(item)))
        try:
            files.extend(_expand(p))
        except OSError as e:  # too long a name, a loop of links, no permission: the OS's reason, one line
            raise DataError(f"data path '{p}' cannot be read: {e.strerror or e}. Check data.path.") from None
    return files


def _expand(p: Path) -> list[Path]:
    """The files of one data path (itself, or the regular files under a directory)."""
    if not p.exists():
        if p.is_symlink():
            raise DataError(f"data path '{p}' is a symbolic link that leads nowhere (its target is missing, or the "
                            f"links form a loop: {os.readlink(p)!r}). Point data.path at the file itself.")
        raise DataError(f"data path '{p}' does not exist. Check data.path (relative paths are taken from {Path.cwd()}).")
    if p.is_dir():
        if not os.access(p, os.R_OK | os.X_OK):
            raise DataError(f"data directory '{p}' cannot be listed: permission denied. Check data.path.")
        found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not found:
            raise DataError(f"data directory '{p}' contains no files.")
        return found
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise DataError(f"data path '{p}' is {kind}, not a file: lmkit reads a corpus twice (tokenizer, cache) "
                        f"and needs regular files. Save the stream to a file first.")
    return [p]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"'{path}' cannot be read: {e.strerror or e}. Check data.path and the file's permissions.") from None
    if b"\x00" in data:  # anywhere: a text file with binary data appended is not text either
        raise DataError(f"'{path}' looks like a binary file (it contains NUL bytes), not text. Point data.path at UTF-8 text files.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not valid UTF-8 (bad byte at offset {e.start}). Convert it to UTF-8, e.g. with iconv.") from None


def files_fingerprint(files: list[Path]) -> str:
    """Cheap identity of a set of files: path, size and modification time."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class Source:
    """A corpus: an identity for caching plus an iterator over documents."""

    def fingerprint(self) -> str:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        raise NotImplementedError


class TextSource(Source):
    """Plain text files (or directories of them); each file is a document, or is split on ``separator``."""

    def __init__(self, path, separator: str | None = None):
        self.files = _paths(path)
        self.separator = separator

    def fingerprint(self) -> str:
        return files_fingerprint(self.files) + f":{self.separator!r}"

    def documents(self) -> Iterator[str]:
        for f in self.files:
            text = _read_text(f)
            if self.separator:
                yield from (d for d in text.split(self.separator) if d.strip())
            elif text.strip():
                yield text


class BuiltinSource(TextSource):
    """A corpus shipped inside the lmkit package."""

    def __init__(self, name: str, separator: str | None = None):
        if name not in BUILTIN_CORPORA:
            raise DataError(f"no built-in corpus '{name}'; built-in corpora: {', '.join(BUILTIN_CORPORA)}")
        super().__init__(BUILTIN_CORPORA[name], separator)


class JsonlSource(Source):
    """JSON-lines files; each line's ``text_field`` is a document."""

    def __init__(self, path, text_field: str = "text"):
        self.files = _paths(path)
        self.text_field = text_field

    def fingerprint(self) -> str:
        return files_fingerprint(self.files) + f":{self.text_field}"

    def documents(self) -> Iterator[str]:
        for f in self.files:
            for lineno, record in jsonl_records(f, f"a '{self.text_field}' field"):
                if self.text_field not in record:
                    keys = [str(k) for k in record]
                    hint = did_you_mean(self.text_field, keys, prefix="data.text_field=")
                    raise DataError(f"{f}:{lineno}: no field '{self.text_field}'.{hint} Set data.text_field to the field "
                                    f"holding the text (this line has: {', '.join(keys[:10]) or 'no fields'}).")
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: field '{self.text_field}' is {type(text).__name__}, not a string.")
                if text.strip():
                    yield text


def jsonl_records(path: Path, wanted: str = "its fields") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSON-lines file; a line that is not a JSON object is
    a DataError naming file and line (``wanted``: what an object should hold, for the message)."""
    for lineno, line in enumerate(_read_text(Path(path)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}). Each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: the line is a JSON {_json_type(record)}, not an object. Each line "
                            f"must be one JSON object with {wanted}.")
        yield lineno, record


def _json_type(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


#: HF ``datasets`` builders for local files (datasets.packaged_modules), for the did-you-mean
HF_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


def check_hf_builder(builder: str) -> None:
    """``data.hf_builder`` names a packaged HF builder (or a local loading script)."""
    names = list(HF_LOCAL_BUILDERS)
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        names += [n for n in _PACKAGED_DATASETS_MODULES if n not in names]
    except Exception:  # another datasets version: the local builders above are enough for the check
        pass
    if builder in names or Path(builder).exists():
        return
    raise DataError(f"unknown data.hf_builder '{builder}'.{did_you_mean(builder, HF_LOCAL_BUILDERS)} Builders for "
                    f"local files: {', '.join(HF_LOCAL_BUILDERS)}.")


class HFDatasetSource(Source):
    """A dataset loaded by HF ``datasets`` from local files (json, csv, parquet, text builders)."""

    def __init__(self, path, builder: str, text_field: str = "text", split: str = "train"):
        self.files = _paths(path)
        check_hf_builder(builder)
        self.builder, self.text_field, self.split = builder, text_field, split

    def fingerprint(self) -> str:
        return files_fingerprint(self.files) + f":{self.builder}:{self.text_field}:{self.split}"

    def documents(self) -> Iterator[str]:
        import datasets

        try:
            ds = datasets.load_dataset(self.builder, data_files=[str(f) for f in self.files], split=self.split)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DataError(f"HF datasets could not load the {self.builder} files {[str(f) for f in self.files][:3]}: "
                            f"{first}") from None
        if self.text_field not in ds.column_names:
            raise DataError(f"dataset has no column '{self.text_field}' (columns: {ds.column_names}). Set data.text_field.")
        for text in ds[self.text_field]:
            if isinstance(text, str) and text.strip():
                yield text
