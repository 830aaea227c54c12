"""``retrieval evaluate``: a decoder scored with and without retrieved neighbours.

``python -m lmkit retrieval evaluate MODEL store=STORE [data=... data.KEY=...] [stride=4] [query_len=32] [k=1]
[method=auto|ralm|retro]``

Two methods: In-Context RALM (Ram et al. 2023), retrieval for any decoder with no change to its
architecture (neighbours prepended to the context), and, for a model that reads neighbours through
chunked cross-attention (RETRO, ``model=retro_*``; ``method=auto`` picks it for such a model), RETRO's own
(Borgeaud et al. 2021): the same rows as without retrieval, each complete chunk of a window given the
store's ``k`` nearest chunks to its own embedding (the training tables' rule), ``query_len`` unused.

The corpus is scored as :func:`lmkit.evaluation.corpus.score_decoder` scores it (the stream with an
``<eos>`` first, windows of ``stride`` targets, every token scored exactly once), twice:

* without retrieval: each window's targets predicted from up to ``seq_len`` preceding tokens (the plain
  sliding window of ``python -m lmkit evaluate`` with ``eval.stride=stride``);
* with retrieval (RALM): before each window, the last ``query_len`` tokens before its first target are embedded
  by the store's encoder and searched; the real tokens of the top ``k`` neighbours (chunk + continuation,
  the best one nearest the context) are prepended, and the context is cut on the left so that neighbours
  + context fit ``seq_len``. The scored targets are the same.

Leakage: ``exclude_same_document=true`` drops neighbours whose value overlaps a document the query or its
targets belong to. Documents are numbered as the store numbers them (each ``<eos>`` ends one); the
evaluated stream's numbers are aligned with the store's when the store holds the evaluated text (built
from the same corpus with the same split, or with ``split=all``: the validation split's documents then
follow the training split's). With a store of other text the exclusion is moot and refused.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkit.errors import ConfigError

USAGE = ("usage: python -m lmkit retrieval evaluate RUN_OR_HF_DIR store=STORE_DIR [data=... data.KEY=...] "
         "[stride=4] [query_len=32] [k=1] [seq_len=N] [exclude_same_document=false] [method=auto|ralm|retro] "
         "[OPTION=VALUE ...]")
INT_OPTIONS = ("stride", "query_len", "k", "seq_len", "batch_size", "max_tokens", "threads", "nprobe", "ef_search")
OPTIONS = ("store", *INT_OPTIONS, "split", "exclude_same_document", "output", "device", "method")
METHODS = ("auto", "ralm", "retro")


@dataclass
class Retriever:
    """Embeds query token rows with a store's encoder and returns the top-``k`` neighbours' tokens.

    ``docs``: the document (in the store's numbering) of each position of the scored stream, or None
    (no exclusion).
    """

    store: object
    encoder: object
    k: int = 1
    docs: np.ndarray | None = None

    def __call__(self, query: np.ndarray, mask: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """(tokens int64 [B, k·r], real bool [B, k·r], chunk ids [B, k]) for queries [B, ℓ] (``mask``: real
        tokens); ``lo``/``hi`` [B]: the first query position and the last target position (for exclusion)."""
        exclude = None if self.docs is None else np.stack([self.docs[lo], self.docs[hi]], axis=1)
        ids, _ = self.store.search(self.encoder.embed(query, mask), self.k, exclude)
        values = self.store.neighbours(ids[:, ::-1])  # the best neighbour last: nearest the context
        real = (values != self.store.manifest["pad_id"]) & (ids[:, ::-1, None] >= 0)
        b = len(query)
        return values.reshape(b, -1), real.reshape(b, -1), ids


@dataclass
class ChunkNeighbours:
    """RETRO's retrieval at evaluation (chunked cross-attention): the store's ``k`` nearest chunks to each
    complete chunk of a window row (the chunk's tokens embedded by the store's encoder, as the training
    tables embed them), each with its continuation. A partial chunk gets none: its neighbours could only
    reach the positions after it, which are padding. ``docs``: as :class:`Retriever`'s.
    """

    store: object
    encoder: object
    k: int
    docs: np.ndarray | None = None

    def model_inputs(self, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> dict:
        """``{"neighbours": int64 [B, l, k, 2m], "neighbour_mask": bool [B, l, k, 2m]}`` for rows ``ids`` [B, W]
        whose first ``lengths`` [B] tokens are real and start at stream position ``starts`` [B]."""
        m = self.store.chunk_len
        b_rows, width = ids.shape
        l = -(-width // m)
        chunks = np.pad(ids, ((0, 0), (0, l * m - width))).reshape(b_rows, l, m)
        complete = (np.arange(l)[None, :] + 1) * m <= lengths[:, None]
        found = np.full((b_rows, l, self.k), -1, dtype=np.int64)
        b, u = np.nonzero(complete)
        if len(b):
            first = starts[b] + u * m
            exclude = None if self.docs is None else np.stack([self.docs[first], self.docs[first + m - 1]], axis=1)
            found[b, u], _ = self.store.search(self.encoder.embed(chunks[b, u]), self.k, exclude)
        values = self.store.neighbours(found)
        real = (values != self.store.manifest["pad_id"]) & (found >= 0)[..., None]
        return {"neighbours": values, "neighbour_mask": real}


def windows(n_tokens: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(first target, end) of each sliding window, as :func:`lmkit.evaluation.corpus.sliding_windows`."""
    from lmkit.evaluation.corpus import sliding_windows

    spans = np.array([(f, e) for _, f, e in sliding_windows(n_tokens, seq_len, stride)], dtype=np.int64)
    return spans[:, 0], spans[:, 1]


def queries(stream: np.ndarray, firsts: np.ndarray, query_len: int, pad_id: int):
    """(ids [B, ℓ], real [B, ℓ]): the ``query_len`` tokens before each first target (fewer at the start),
    right-padded so that a query's tokens take the positions a store chunk's tokens took."""
    n = np.minimum(firsts, query_len)
    j = np.arange(query_len)[None, :]
    real = j < n[:, None]
    at = np.clip((firsts - n)[:, None] + j, 0, len(stream) - 1)
    return np.where(real, stream[at], pad_id), real


def build_rows(stream: np.ndarray, firsts: np.ndarray, ends: np.ndarray, seq_len: int, pad_id: int,
               prefix: np.ndarray | None = None, prefix_real: np.ndarray | None = None):
    """Model inputs for a batch of windows: ``[prefix's real tokens ; context]``, right-padded.

    The context of window b is ``stream[ends[b] - 1 - c : ends[b] - 1]`` with c = min(ends[b] - 1,
    seq_len - prefix tokens). Returns (ids [B, W], positions [B, stride_max] of the hidden states that
    predict the targets, targets [B, stride_max], valid [B, stride_max]).
    """
    b = len(firsts)
    if prefix is None or prefix.shape[1] == 0:
        prefix, prefix_real = np.zeros((b, 0), np.int64), np.zeros((b, 0), bool)
    order = np.argsort(~prefix_real, axis=1, kind="stable")  # real tokens first, in their order
    prefix = np.take_along_axis(prefix, order, axis=1)
    m = prefix_real.sum(1)
    c = np.minimum(ends - 1, seq_len - m)
    n = ends - firsts
    if (c < n).any():
        raise ConfigError(f"{int(m.max())} retrieved tokens leave fewer than stride={int(n.max())} positions of "
                          f"context in seq_len={seq_len}: use a larger seq_len, a smaller k or a store with a "
                          f"shorter chunk_len")
    length = m + c
    j = np.arange(int(length.max()))[None, :]
    from_prefix = prefix[:, np.clip(j[0], 0, max(prefix.shape[1] - 1, 0))] if prefix.shape[1] else 0
    ctx = stream[np.clip((ends - 1 - c)[:, None] + j - m[:, None], 0, len(stream) - 1)]
    ids = np.where(j < m[:, None], from_prefix, np.where(j < length[:, None], ctx, pad_id))
    t = np.arange(int(n.max()))[None, :]
    valid = t < n[:, None]
    positions = np.where(valid, (length - n)[:, None] + t, 0)
    targets = np.where(valid, stream[np.clip(firsts[:, None] + t, 0, len(stream) - 1)], 0)
    return ids.astype(np.int64), positions, targets, valid


@torch.no_grad()
def _nll(model, ids, positions, targets, valid, **inputs) -> float:
    """Summed NLL of ``targets`` at ``positions`` (where ``valid``); ``inputs``: further model inputs (arrays)."""
    device = next(model.parameters()).device
    hidden = model(torch.as_tensor(ids, device=device),
                   **{key: torch.as_tensor(value, device=device) for key, value in inputs.items()})
    rows = torch.as_tensor(np.nonzero(valid)[0], device=device)
    pos = torch.as_tensor(positions[valid], device=device)
    logprobs = torch.log_softmax(model.logits(hidden[rows, pos]).float(), dim=-1)
    return -float(logprobs.gather(-1, torch.as_tensor(targets[valid], device=device)[:, None]).sum())


def score_ralm(model, stream: np.ndarray, byte_lengths: np.ndarray, *, seq_len: int, stride: int,
               query_len: int = 32, retriever=None, pad_id: int = 0, batch_size: int = 16, progress=None) -> dict:
    """``{"without": CorpusScore, "with": CorpusScore, "neighbour_tokens": mean neighbour tokens, ...}`` of
    ``stream`` (``<eos>`` first) under the decoder ``model``; ``retriever`` None (or k = 0): no retrieval; a
    :class:`Retriever` (or any callable of its signature): neighbours prepended to the context (In-Context
    RALM); a :class:`ChunkNeighbours`: the same rows, neighbours given to RETRO's chunked cross-attention
    (``query_len`` unused)."""
    from lmkit.evaluation.corpus import CorpusScore

    check_settings(stride, query_len, seq_len)
    stream = np.asarray(stream, dtype=np.int64)
    firsts, ends = windows(len(stream), seq_len, stride)
    plain, ralm = CorpusScore(), CorpusScore()
    prepended, seconds = 0, {"without": 0.0, "with": 0.0, "retrieval": 0.0}
    for at in range(0, len(firsts), batch_size):
        f, e = firsts[at:at + batch_size], ends[at:at + batch_size]
        t0 = time.perf_counter()
        rows = build_rows(stream, f, e, seq_len, pad_id)
        nll = _nll(model, *rows)
        plain.nll += nll
        t1 = time.perf_counter()
        inputs, used = {}, 0
        if hasattr(retriever, "model_inputs"):  # RETRO: the same rows, neighbours read through CCA
            c = np.minimum(e - 1, seq_len)
            inputs = retriever.model_inputs(rows[0], e - 1 - c, c)
            used = int(inputs["neighbour_mask"].sum())
        elif retriever is not None:  # In-Context RALM: neighbours prepended, the context cut to fit
            q, q_real = queries(stream, f, query_len, pad_id)
            prefix, real, _ = retriever(q, q_real, np.maximum(f - query_len, 0), e - 1)
            used = int(real.sum())
            if used:
                rows = build_rows(stream, f, e, seq_len, pad_id, prefix, real)
        prepended += used
        t2 = time.perf_counter()
        if used:
            nll = _nll(model, *rows, **inputs)
        ralm.nll += nll  # no neighbour: the same rows as without retrieval
        t3 = time.perf_counter()
        seconds["without"] += t1 - t0
        seconds["retrieval"] += t2 - t1
        seconds["with"] += t3 - t2
        if progress is not None:
            progress(int((e - f).sum()))
    n_bytes = int(byte_lengths[stream[1:]].sum())
    for score in (plain, ralm):
        score.tokens, score.bytes = len(stream) - 1, n_bytes
    return {"without": plain, "with": ralm, "windows": len(firsts),
            "neighbour_tokens": prepended / max(len(firsts), 1), "seconds": seconds}


def check_settings(stride, query_len, seq_len=None) -> None:
    for key, value in (("stride", stride), ("query_len", query_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"retrieval evaluate: {key}={value} must be a whole number >= 1 ({key}: "
                              + ("tokens scored between retrievals, 4 in the paper)" if key == "stride"
                                 else "tokens before each window that form the query, 32 in the paper)"))
    if seq_len is not None and stride > seq_len:
        raise ConfigError(f"retrieval evaluate: stride={stride} is longer than seq_len={seq_len}")


def document_offset(store, info: dict, eos_id: int, load_split) -> int:
    """The store's number of the evaluated stream's first document (see the module docstring), or a
    ConfigError where the store does not hold the evaluated text. ``load_split(split)``: the evaluated
    corpus's tokens of ``split`` (all of them)."""
    stored = store.manifest.get("data") or {}
    same_corpus = str(stored.get("path")) == str(info["path"]) and stored.get("source") == info["source"]
    if same_corpus and (stored.get("split") == info["split"] or (stored.get("split") == "all"
                                                                 and info["split"] == "train")):
        return 0
    if same_corpus and stored.get("split") == "all" and info["split"] == "val":
        everything = np.asarray(load_split("all"))
        n_train = len(everything) - len(load_split("val"))  # validation is the stream's tail
        return int((everything[:n_train] == eos_id).sum())
    raise ConfigError(f"exclude_same_document=true: the store '{store.path}' holds {stored.get('path')} "
                      f"(split {stored.get('split')}), not the evaluated {info['path']} (split {info['split']}), so "
                      f"no neighbour can come from the evaluated documents; drop the option, or build the store "
                      f"from the evaluated corpus (split=all or split={info['split']})")


def _parse(argv: list[str]):
    from lmkit.commands import split_options

    data = [a for a in argv if "=" in a and (a.split("=", 1)[0].lstrip("+~") == "data"
                                            or a.split("=", 1)[0].lstrip("+~").startswith("data."))]
    positionals, given = split_options([a for a in argv if a not in data], "retrieval evaluate", OPTIONS, USAGE)
    opts = {}
    for key, raw in given.items():
        if key in INT_OPTIONS:
            try:
                opts[key] = int(raw)
            except ValueError:
                raise ConfigError(f"retrieval evaluate: {key}={raw} is not a whole number") from None
        elif key == "exclude_same_document":
            if raw.lower() not in ("true", "false"):
                raise ConfigError(f"retrieval evaluate: exclude_same_document={raw}: give true or false")
            opts[key] = raw.lower() == "true"
        else:
            opts[key] = raw
    if len(positionals) != 1:
        got = f" (got {', '.join(positionals)})" if positionals else ""
        raise ConfigError(f"retrieval evaluate takes one model: a run directory, checkpoint or HF directory{got}. "
                          f"{USAGE}")
    if "store" not in opts:
        raise ConfigError(f"retrieval evaluate needs store=STORE_DIR (python -m lmkit retrieval build). {USAGE}")
    for key in ("k", "batch_size", "seq_len", "max_tokens"):
        if key in opts and opts[key] < (0 if key == "k" else 1):
            raise ConfigError(f"retrieval evaluate: {key}={opts[key]} must be >= {0 if key == 'k' else 1}")
    check_settings(opts.get("stride", 4), opts.get("query_len", 32))
    from lmkit.config.checks import check_choice

    check_choice("method", opts.get("method", "auto"), METHODS)
    return positionals[0], opts, data


def evaluate(model_path, opts: dict, data_overrides: list[str]) -> dict:
    """Score the corpus with and without retrieval (the Python API behind the CLI); returns the results."""
    from lmkit.commands.generate import _device
    from lmkit.evaluation.run import EvalOptions, corpus_tokens, load_model
    from lmkit_retrieval.store import Datastore

    stride, query_len = opts.get("stride", 4), opts.get("query_len", 32)
    store = Datastore.open(opts["store"])  # a missing store fails before the model is read
    for key in ("nprobe", "ef_search"):
        if key in opts:
            setattr(store.spec, key, opts[key])
    store.spec.check()
    device = _device(opts.get("device", "auto"))
    loaded = load_model(model_path, device)
    model, tok = loaded.model, loaded.tokenizer
    if model.kind != "decoder":
        raise ConfigError(f"retrieval evaluate needs a decoder: {model_path} is a {loaded.architecture} "
                          f"{model.kind.replace('_', '-')} (In-Context RALM prepends text to a left-to-right "
                          f"model's context)")
    store.check_compatible(tok)
    retro = _uses_cca(model, loaded.architecture, opts.get("method", "auto"))
    k = opts.get("k", model.n_neighbours if retro else 1)
    if retro:
        _check_retro(model, store, k)
    max_len = getattr(model, "max_seq_len", None) or 512
    trained = (loaded.run_config.get("data") or {}).get("seq_len")
    seq_len = opts.get("seq_len") or min(trained or max_len, max_len, 1024)
    if seq_len > max_len:
        raise ConfigError(f"retrieval evaluate: seq_len={seq_len} is longer than the model's max_seq_len={max_len}")
    check_settings(stride, query_len, seq_len)
    if k and not retro and k * 2 * store.chunk_len + stride > seq_len:
        raise ConfigError(f"retrieval evaluate: k={k} neighbours of {2 * store.chunk_len} tokens leave no room for "
                          f"stride={stride} in seq_len={seq_len}: use a larger seq_len or a smaller k")
    tokens, info = corpus_tokens(loaded, data_overrides,
                                 EvalOptions(split=opts.get("split"), max_tokens=opts.get("max_tokens")).check())
    stream = np.concatenate([[tok.eos_id], np.asarray(tokens, dtype=np.int64)])
    retriever = None
    if k:
        from lmkit_retrieval.store import document_ids

        encoder = store.load_encoder(device)
        docs = None
        if opts.get("exclude_same_document"):
            offset = document_offset(store, info, tok.eos_id, lambda split: corpus_tokens(
                loaded, data_overrides, EvalOptions(split=split).check())[0])
            token_docs = document_ids(np.asarray(tokens), tok.eos_id) + offset
            docs = np.concatenate([token_docs[:1], token_docs])  # the leading <eos> joins the first document
        retriever = (ChunkNeighbours if retro else Retriever)(store, encoder, k, docs)
    byte_lengths = np.asarray(tok.token_byte_lengths(), dtype=np.int64)
    from lmkit.evaluation.run import _progress

    with _progress(len(stream) - 1, "ralm") as bar:
        out = score_ralm(model, stream, byte_lengths, seq_len=seq_len, stride=stride, query_len=query_len,
                         retriever=retriever, pad_id=tok.eos_id, batch_size=opts.get("batch_size", 16),
                         progress=bar.update)
    return {"model": str(model_path), "architecture": loaded.architecture,
            "run_dir": None if loaded.run_dir is None else str(loaded.run_dir), "store": str(store.path),
            "store_data": store.manifest.get("data"), "corpus": info,
            "method": ("RETRO chunked cross-attention (Borgeaud et al. 2021)" if retro
                       else "In-Context RALM (Ram et al. 2023)"),
            "seq_len": seq_len, "stride": stride, "query_len": None if retro else query_len, "k": k,
            "exclude_same_document": bool(opts.get("exclude_same_document")), "windows": out["windows"],
            "neighbour_tokens_per_window": out["neighbour_tokens"], "seconds": out["seconds"],
            "without_retrieval": out["without"].metrics(), "with_retrieval": out["with"].metrics()}


def _uses_cca(model, architecture: str, method: str) -> bool:
    """Whether to give neighbours through chunked cross-attention (RETRO) rather than in the context."""
    reads_neighbours = "neighbours" in getattr(model, "accepts", ())
    if method == "retro" and not reads_neighbours:
        raise ConfigError(f"retrieval evaluate: method=retro needs a model that reads neighbours through chunked "
                          f"cross-attention (model=retro_tiny|retro_small); this is a {architecture}: use "
                          f"method=ralm (neighbours prepended to the context)")
    return reads_neighbours and method != "ralm"


def _check_retro(model, store, k: int) -> None:
    m = store.chunk_len
    if model.chunk_len != m:
        raise ConfigError(f"retrieval evaluate: the model's chunk_len={model.chunk_len} differs from the store's "
                          f"chunk_len={m}; use a store built with chunk_len={model.chunk_len} (or method=ralm)")
    if k not in (0, model.n_neighbours):
        raise ConfigError(f"retrieval evaluate: k={k}, but this RETRO model reads n_neighbours={model.n_neighbours} "
                          f"neighbours per chunk; leave k out (or k=0 for no retrieval)")
    if model.cfg.neighbour_tokens < 2 * m:
        raise ConfigError(f"retrieval evaluate: the model's neighbour_len={model.cfg.neighbour_tokens} is shorter "
                          f"than the store's neighbours (2·chunk_len = {2 * m} tokens)")


def format_results(results: dict) -> str:
    c = results["corpus"]
    lines = [f"model: {results['model']} ({results['architecture']})",
             f"corpus: {c['path']} (split {c['split']}), sliding window {results['seq_len']}, stride "
             f"{results['stride']}; store {results['store']} (split {(results['store_data'] or {}).get('split')}), "
             + (f"query {results['query_len']} tokens, " if results["query_len"]
                else "neighbours of each chunk (CCA), ")
             + f"k {results['k']}"
             + (", own documents excluded" if results["exclude_same_document"] else ""),
             f"  {'':<18} {'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}"]
    for label, key in (("without retrieval", "without_retrieval"), ("with retrieval", "with_retrieval")):
        m = results[key]
        lines.append(f"  {label:<18} {m['tokens']:>10} {m['loss']:>8.4f} {m['perplexity']:>11.3f} "
                     f"{m.get('bits_per_byte', math.nan):>10.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m lmkit retrieval evaluate``."""
    from lmkit.evaluation.run import write_json

    model_path, opts, data = _parse(argv)
    if "threads" in opts:
        from lmkit_retrieval.index import set_threads

        set_threads(opts["threads"])
    results = evaluate(model_path, opts, data)
    if opts.get("output"):
        out = Path(opts["output"])
    else:
        base = Path(results["run_dir"]) if results["run_dir"] else Path("outputs")
        out = base / "eval" / f"ralm-{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    write_json(out, results)
    print(format_results(results))
    print(f"results: {out}")
    sys.stdout.flush()
    return 0
