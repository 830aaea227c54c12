"""``python -m lmkit optimize OUT_DIR [DATA AND TOKENIZER OVERRIDES] [--workers N] [--chunk-tokens N] [--part R/N] [--force]``.
``python -m lmkit optimize OUT_DIR --merge PART_DIR... [--force]``.

Tokenizes a corpus into a litdata token store (see lmkit.data.litdata_store) that ``data=litdata
data.path=OUT_DIR`` streams, locally or from object storage once the directory is copied there. The
corpus and tokenizer are named as for a run (``data=text data.path=corpus/ tokenizer=bpe``); the
validation split is ``data.val_path`` or the last ``data.val_fraction`` of the tokens, as in a run.
Tokenization streams in bounded memory over all cores (the token cache under data.cache_dir is reused);
litdata's optimize then writes chunks of ``--chunk-tokens`` tokens (default 4194304) with ``--workers``
processes (default: the cores). OUT_DIR must be new or empty; ``--force`` replaces a store. The store
appears whole or not at all.

Across machines: machine R of N runs the same command with ``--part R/N`` (and its own OUT_DIR); it
tokenizes only its share of the corpus files (the R-th of N contiguous runs of the sorted files; a
trained tokenizer is still trained on all of them, so every part has the same one) and splits off its
own validation tail (or, with data.val_path, part 0 writes the validation split). ``--merge`` then
joins the N parts into one store (chunks in part order, litdata's merge_datasets), refusing parts of
another corpus or tokenizer and missing or repeated parts.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lmkit.errors import ConfigError, DataError

USAGE = ("usage: python -m lmkit optimize OUT_DIR [data=text data.path=... tokenizer=... data.val_fraction=...] "
         "[--workers N] [--chunk-tokens N] [--part R/N] [--force]  |  optimize OUT_DIR --merge PART_DIR... [--force]")
_VALUED = ("--workers", "--chunk-tokens")


def _part(raw: str) -> tuple[int, int]:
    try:
        rank, count = (int(x) for x in raw.split("/"))
        assert 0 <= rank < count
    except (ValueError, AssertionError):
        raise ConfigError(f"optimize: --part takes R/N with 0 <= R < N (this machine's share of N), got {raw!r}") from None
    return rank, count


def parse(argv: list[str]) -> tuple[str, list[str], dict]:
    """(output directory, config overrides, options)."""
    options = {"force": False, "workers": os.cpu_count() or 1, "chunk_tokens": None, "part": None}
    positional, overrides = [], []
    it = iter(argv)
    for arg in it:
        name, _, inline = arg.partition("=")
        if arg == "--force":
            options["force"] = True
        elif arg == "--merge":
            options["merge"] = True
        elif name == "--part":
            options["part"] = _part(inline or next(it, ""))
        elif name in _VALUED:
            raw = inline or next(it, "")
            try:
                value = int(raw)
                assert value >= 1
            except (ValueError, AssertionError):
                raise ConfigError(f"optimize: {name} takes a whole number >= 1, got {raw!r}. {USAGE}") from None
            options[name[2:].replace("-", "_")] = value
        elif arg.startswith("-"):
            raise ConfigError(f"optimize: unknown option {arg}. {USAGE}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            positional.append(arg)
    if options.pop("merge", False):
        if overrides or options["part"] or len(positional) < 3:
            raise ConfigError(f"optimize --merge takes the output directory and the part directories (at least two), "
                              f"nothing else. {USAGE}")
        return positional[0], positional[1:], {"force": options["force"], "merge": True}
    if len(positional) != 1:
        raise ConfigError(f"optimize takes one output directory{f', got {positional}' if positional else ''}. {USAGE}")
    return positional[0], overrides, options


def optimize(out_dir: str, overrides: list[str], *, workers: int = 1, chunk_tokens: int | None = None,
             force: bool = False, part: tuple[int, int] | None = None) -> dict:
    """Write the store (``part``: only share R of N of the files); returns its lmkit.json (plus ``path``)."""
    from lmkit.api import load_run_config
    from lmkit.data.cache import default_cache_dir, load_tokens, token_cache_path
    from lmkit.data.datamodule import split_tokens, tokens_digest
    from lmkit.data.litdata_store import DEFAULT_CHUNK_TOKENS, write_store
    from lmkit.data.mixture import build_val_source, renamed

    run = load_run_config(overrides)
    data = run.data
    if data.source in ("litdata", "mixture"):
        raise ConfigError(f"optimize reads a text corpus (data=text, jsonl, hf or the built-in corpus), not "
                          f"data={data.source}")
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    source = run.dataset_component.factory(data)
    val_source = build_val_source(data, run.dataset_component)
    tok_cfg = dataclasses.replace(run.tokenizer, num_sentinels=0)  # an objective adds its sentinels when it trains
    tokenizer = run.tokenizer_component.factory(tok_cfg, source, cache_dir)  # trained on all files, for every part
    part_info = None
    if part is not None:
        corpus = source.fingerprint()
        source = _share(run, source, *part)
        if val_source is not None and part[0] != 0:
            val_source = None
            data = dataclasses.replace(data, val_fraction=0.0)  # part 0 writes data.val_path's split
        part_info = {"rank": part[0], "count": part[1], "corpus": f"{corpus}|{data.val_path}|{run.data.val_fraction}"}
    tokens = load_tokens(source, tokenizer, cache_dir)
    path = token_cache_path(source, tokenizer, cache_dir)
    if val_source is not None:
        with renamed("data", "val_path"):
            val_tokens = load_tokens(val_source, tokenizer, cache_dir)
        splits = {"train": (path, 0, len(tokens)),
                  "val": (token_cache_path(val_source, tokenizer, cache_dir), 0, len(val_tokens))}
        digests = {"train": tokens_digest(tokens), "val": tokens_digest(val_tokens)}
    else:  # the split a run makes (lmkit.data.datamodule.split_tokens)
        parts = split_tokens(tokens, data.val_fraction)
        cut = len(parts.train)
        splits = {"train": (path, 0, cut), "val": (path, cut, len(tokens))}
        digests = {"train": tokens_digest(parts.train), "val": tokens_digest(parts.val) if len(parts.val) else None}
    if splits["train"][2] - splits["train"][1] < 2:
        raise DataError("the corpus has too few tokens for a training split; check data.path and data.val_fraction")
    info = {
        "tokenizer": {"name": tok_cfg.name, "vocab_size": tok_cfg.vocab_size},
        "source": {"kind": data.source, "path": data.path, "val_path": data.val_path, "text_field": data.text_field},
        "val_fraction": None if val_source is not None else data.val_fraction, "digests": digests,
        **({"part": part_info} if part_info else {}),
    }
    meta = write_store(out_dir, splits, tokenizer, info, chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS,
                       workers=workers, overwrite=force)
    return {**meta, "path": str(Path(os.path.expanduser(out_dir)).absolute())}


def _share(run, source, rank: int, count: int):
    """The source restricted to the ``rank``-th of ``count`` contiguous runs of its sorted files."""
    files = getattr(source, "files", None)
    if files is None or len(files) < count:
        n = "no list of files" if files is None else f"{len(files)} file{'s' * (len(files) != 1)}"
        raise ConfigError(f"optimize --part {rank}/{count} shares the corpus files among {count} machines, but "
                          f"data.source={run.data.source} has {n}: use at most that many parts")
    share = files[rank * len(files) // count:(rank + 1) * len(files) // count]
    return run.dataset_component.factory(dataclasses.replace(run.data, path=[str(f) for f in share], val_path=None))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    out_dir, overrides, options = parse(argv)
    if options.pop("merge", False):
        from lmkit.data.litdata_store import merge_stores

        meta = {**merge_stores(out_dir, overrides, overwrite=options["force"]),
                "path": str(Path(os.path.expanduser(out_dir)).absolute())}
    else:
        meta = optimize(out_dir, overrides, **options)
    counts = ", ".join(f"{name} {n:,} tokens" for name, n in meta["tokens"].items())
    if "part" in meta:
        rank, count = meta["part"]["rank"], meta["part"]["count"]
        print(f"lmkit: wrote part {rank}/{count} of a litdata store at {meta['path']} ({counts}). When all {count} "
              f"parts are written: python -m lmkit optimize OUT_DIR --merge PART_DIR_0 ... PART_DIR_{count - 1}")
        return 0
    print(f"lmkit: wrote litdata store {meta['path']} ({counts}; tokenizer {meta['tokenizer']['name']}). "
          f"Train on it with: python -m lmkit data=litdata data.path={meta['path']}")
    return 0
