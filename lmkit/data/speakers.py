"""A classification task from the built-in corpus: which of its most frequent speakers says a line.

Tiny Shakespeare is a sequence of speeches, each ``NAME:`` on its own line followed by the
speech's lines. :func:`speaker_records` keeps the lines of the ``n_speakers`` speakers with
the most lines (ties by name) and labels each with its speaker; the records are shuffled with
a fixed seed, so the last ``data.val_fraction`` of them is a held-out set drawn from every
play. :func:`build_speaker_task` writes them as jsonl into the cache directory (once per
corpus: the file name holds the corpus's hash), atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from lmkit.data.cache import cache_writes
from lmkit.data.sources import BUILTIN_CORPORA

N_SPEAKERS = 10
_SHUFFLE_SEED = 0


def speaker_records(text: str, n_speakers: int = N_SPEAKERS) -> list[dict]:
    """``{"text": line, "label": speaker}`` for every line of the ``n_speakers`` most frequent speakers."""
    lines: list[tuple[str, str]] = []
    for speech in text.split("\n\n"):
        head, _, body = speech.strip("\n").partition("\n")
        if not head.endswith(":") or not body:
            continue
        speaker = head[:-1].strip()
        lines += [(line.strip(), speaker) for line in body.split("\n") if line.strip()]
    counts = Counter(speaker for _, speaker in lines)
    top = {s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_speakers]}
    records = [{"text": t, "label": s} for t, s in lines if s in top]
    order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(records))
    return [records[i] for i in order]


def build_speaker_task(cache_dir: Path, corpus: Path = BUILTIN_CORPORA["tinyshakespeare"],
                       n_speakers: int = N_SPEAKERS) -> Path:
    """The speaker task as jsonl under ``cache_dir/tasks`` (built on first use); returns its path."""
    data = Path(corpus).read_bytes()
    digest = hashlib.sha256(data + f"|{n_speakers}|{_SHUFFLE_SEED}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tasks" / f"speakers{n_speakers}-{digest}.jsonl"
    if path.is_file():
        return path
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in speaker_records(data.decode("utf-8"), n_speakers))
    with cache_writes(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path
