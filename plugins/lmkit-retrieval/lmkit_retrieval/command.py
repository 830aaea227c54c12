"""``python -m lmkit retrieval build|search``: build a retrieval store, or look up a text's neighbours in one.

  python -m lmkit retrieval build OUT_DIR encoder=RUN_OR_HF_DIR [data=... data.KEY=...] [OPTION=VALUE ...]
  python -m lmkit retrieval search STORE_DIR query="some text" [k=4] [exclude_doc=N] [nprobe=N] [ef_search=N]

build: the corpus is composed as training composes data (default: the built-in corpus),
tokenized with the encoder's tokenizer (lmkit's token cache), and ``split`` of it (train by
default) is cut into chunks of ``chunk_len`` tokens, embedded by the encoder (mean-pooled last
hidden states) and indexed. Any lmkit run (a cheap one: python -m lmkit +objective=mlm) or
local Hugging Face directory serves as the encoder. An interrupted build resumes when rerun.

Build options:
  encoder=PATH              lmkit run directory, checkpoint or local HF directory (required)
  chunk_len=64              tokens per chunk (values are 2·chunk_len: chunk + continuation)
  index=flat                flat (exact cosine) | ivfpq | hnsw
  keys=center               center | whiten | raw: embeddings -> index keys (lmkit_retrieval/keys.py)
  nlist= m= nbits=8 nprobe=8 train_size=65536 seed=1234     ivfpq settings (nlist, m: automatic)
  M=32 ef_construction=40 ef_search=64                       hnsw settings
  split=train               train | val | all (of the corpus, as training splits it)
  max_tokens=N              only the first N tokens of the split
  shard_size=4096           chunks embedded per resumable shard
  batch_size=64             chunks per forward pass
  device=cpu  threads=N     torch and faiss threads (default: torch's)
  force=false               replace an existing OUT_DIR
Search options: query=TEXT (required), k=4, exclude_doc=N, nprobe=N, ef_search=N, device, threads.
evaluate: python -m lmkit retrieval evaluate RUN_OR_HF_DIR store=STORE_DIR [data=...] [stride=4] [query_len=32]
  [k=1] [seq_len=N] [exclude_same_document=false] [batch_size=16] [split=] [max_tokens=N] [output=PATH]
  [method=auto|ralm|retro]: bits/byte and perplexity of a decoder with and without retrieved neighbours: prepended
  (In-Context RALM), or through chunked cross-attention for a RETRO model (lmkit_retrieval/ralm.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmkit.commands import split_options
from lmkit.errors import ConfigError, did_you_mean

USAGE = ("usage: python -m lmkit retrieval build OUT_DIR encoder=RUN_OR_HF_DIR [data=... data.KEY=...] "
         "[chunk_len=64] [index=flat|ivfpq|hnsw] [OPTION=VALUE ...] | python -m lmkit retrieval search STORE_DIR "
         "query=TEXT [k=4]")
SUBCOMMANDS = ("build", "search")
SUBCOMMANDS = (*SUBCOMMANDS, "evaluate")  # In-Context RALM: lmkit_retrieval/ralm.py
INT_OPTIONS = ("chunk_len", "nlist", "m", "nbits", "nprobe", "train_size", "M", "ef_construction", "ef_search", "seed",
               "shard_size", "batch_size", "max_tokens", "threads", "k", "exclude_doc")
INDEX_OPTIONS = ("nlist", "m", "nbits", "nprobe", "train_size", "M", "ef_construction", "ef_search", "seed")
BUILD_OPTIONS = ("encoder", "chunk_len", "index", "keys", *INDEX_OPTIONS, "split", "max_tokens", "shard_size",
                 "batch_size", "device", "threads", "force")
SEARCH_OPTIONS = ("query", "k", "exclude_doc", "nprobe", "ef_search", "device", "threads")
SPLITS = ("train", "val", "all")


def _typed(key: str, raw: str):
    if key in INT_OPTIONS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"retrieval: {key}={raw} is not an integer") from None
    if key == "force":
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"retrieval: force={raw}: give true or false")
        return raw.lower() == "true"
    return raw


def _parse(argv: list[str], verb: str, options) -> tuple[list[str], dict, list[str]]:
    """(positionals, typed options, data overrides)."""
    data = [a for a in argv if "=" in a and (a.split("=", 1)[0].lstrip("+~") == "data"
                                            or a.split("=", 1)[0].lstrip("+~").startswith("data."))]
    rest = [a for a in argv if a not in data]
    positionals, given = split_options(rest, verb, options, USAGE)
    return positionals, {k: _typed(k, v) for k, v in given.items()}, data


def _one_dir(positionals: list[str], verb: str, what: str) -> Path:
    if len(positionals) != 1:
        got = f" (got {', '.join(positionals)})" if positionals else ""
        raise ConfigError(f"{verb} takes one {what}{got}. {USAGE}")
    return Path(positionals[0])


def corpus_stream(tokenizer, data_overrides: list[str], split: str = "train", max_tokens: int | None = None):
    """(token stream, description): the data overrides composed as training composes them (default: the
    built-in corpus), tokenized with ``tokenizer`` through lmkit's token cache, cut to ``split``."""
    from lmkit.commands.train import prepare
    from lmkit.config.checks import check_choice
    from lmkit.config.compose import compose_config
    from lmkit.config.schema import DataConfig
    from lmkit.config.validate import typed_section
    from lmkit.data.cache import default_cache_dir, load_tokens
    from lmkit.data.datamodule import split_tokens
    from lmkit.plugins import get_plugin_manager

    check_choice("split", split, SPLITS)
    pm = get_plugin_manager()
    node = compose_config(pm.config_dirs(), prepare(list(data_overrides), pm).overrides).data
    data = typed_section("data", node, DataConfig)
    source = pm.get("dataset", data.source).factory(data)
    tokens = load_tokens(source, tokenizer, Path(data.cache_dir) if data.cache_dir else default_cache_dir())
    if split != "all":
        if data.val_fraction <= 0:
            raise ConfigError(f"split={split} needs data.val_fraction > 0 (the corpus has no validation split)")
        parts = split_tokens(tokens, data.val_fraction)
        tokens = parts.train if split == "train" else parts.val
    if max_tokens:
        tokens = tokens[:max_tokens]
    where = str(data.path) if data.path else data.source
    return tokens, {"source": data.source, "path": where, "split": split, "doc_separator": data.doc_separator,
                    "val_fraction": data.val_fraction, "max_tokens": max_tokens}


def _threads(options: dict) -> None:
    from lmkit_retrieval.index import set_threads

    if "threads" in options:
        set_threads(options["threads"])


def build(argv: list[str]) -> int:
    from tqdm import tqdm

    from lmkit.config.checks import check_choice

    from lmkit_retrieval.encoder import ChunkEncoder
    from lmkit_retrieval.index import IndexSpec
    from lmkit_retrieval.keys import KEY_MODES
    from lmkit_retrieval.store import build_store

    positionals, opts, data = _parse(argv, "retrieval build", BUILD_OPTIONS)
    out = _one_dir(positionals, "retrieval build", "output directory")
    if "encoder" not in opts:
        raise ConfigError("retrieval build needs encoder=PATH: an lmkit run directory (e.g. one trained with "
                          "python -m lmkit +objective=mlm), a checkpoint or a local Hugging Face directory")
    spec = IndexSpec.from_dict({"kind": opts.get("index", "flat"), **{k: opts[k] for k in INDEX_OPTIONS if k in opts}})
    check_choice("keys", opts.get("keys", "center"), KEY_MODES)
    _threads(opts)
    encoder = ChunkEncoder.load(opts["encoder"], opts.get("device", "cpu"))
    tokens, description = corpus_stream(encoder.tokenizer, data, opts.get("split", "train"), opts.get("max_tokens"))
    chunk_len = opts.get("chunk_len", 64)
    with tqdm(total=len(tokens) // max(chunk_len, 1), desc="embed", unit="chunk", file=sys.stderr, leave=False,
              disable=None) as bar:
        store = build_store(out, tokens, encoder, chunk_len=chunk_len, index=spec, data=description,
                            shard_size=opts.get("shard_size", 4096), batch_size=opts.get("batch_size", 64),
                            keys=opts.get("keys", "center"),
                            force=opts.get("force", False), progress=bar.update)
    print(f"retrieval store {out}: {store.n_chunks} chunks of {store.chunk_len} tokens, d={store.d}, "
          f"index {store.spec.kind}, keys {store.key_mode}, {len(tokens)} tokens of {description['path']} "
          f"({description['split']})")
    return 0


def search(argv: list[str]) -> int:
    from lmkit_retrieval.store import Datastore

    positionals, opts, data = _parse(argv, "retrieval search", SEARCH_OPTIONS)
    if data:
        raise ConfigError(f"retrieval search takes no data options (got {data[0]}): the store holds its corpus")
    path = _one_dir(positionals, "retrieval search", "store directory")
    if "query" not in opts:
        raise ConfigError('retrieval search needs query="some text"')
    _threads(opts)
    store = Datastore.open(path)
    for key in ("nprobe", "ef_search"):
        if key in opts:
            setattr(store.spec, key, opts[key])
    store.spec.check()
    encoder = store.load_encoder(opts.get("device", "cpu"))
    exclude = None if "exclude_doc" not in opts else [opts["exclude_doc"]]
    ids, scores = store.search(encoder.embed_texts([opts["query"]]), opts.get("k", 4), exclude)
    values = store.neighbours(ids[0])
    tok = encoder.tokenizer
    for rank, (i, score, value) in enumerate(zip(ids[0], scores[0], values), 1):
        if i < 0:
            print(f"#{rank}: none (fewer chunks than k remain)")
            continue
        first, last = store.docs[i]
        docs = f"doc {first}" if first == last else f"docs {first}-{last}"
        print(f"#{rank}  chunk {i}  ({docs})  cosine {score:.4f}")
        print(f"  chunk:        {tok.decode(value[:store.chunk_len].tolist())!r}")
        print(f"  continuation: {tok.decode(value[store.chunk_len:].tolist())!r}")
    return 0


def main(argv: list[str]) -> int:
    """The ``retrieval`` verb."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip().replace("``", ""))
        return 0
    if not argv:
        raise ConfigError(f"retrieval needs a subcommand: {' or '.join(SUBCOMMANDS)}. {USAGE}")
    sub, rest = argv[0], argv[1:]
    if sub not in SUBCOMMANDS:
        raise ConfigError(f"retrieval: unknown subcommand '{sub}'.{did_you_mean(sub, SUBCOMMANDS)} "
                          f"Subcommands: {', '.join(SUBCOMMANDS)}. {USAGE}")
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__.strip().replace("``", ""))
        return 0
    if sub == "evaluate":
        from lmkit_retrieval.ralm import main as ralm_main

        return ralm_main(rest)
    return build(rest) if sub == "build" else search(rest)
