"""Weighted data mixtures (The Pile style) and separate validation files (``data.val_path``).

``data=mixture data.mixture=[{source: text, path: a/, weight: 0.7}, {source: jsonl, path: b.jsonl, weight: 0.3}]``:
each entry is a source of its own (the ``data.*`` source keys of :data:`MEMBER_KEYS`), tokenized and cached on its
own with the run's one tokenizer (a trained tokenizer learns from the concatenation of the entries' training
text) and split into training and validation by its own ``val_fraction`` or ``val_path``.

Sampling. The normalized weights are realised as integer counts ``c_k`` per round of ``R = Σ c_k`` stream
positions (the smallest ``R <= MAX_ROUND`` at which every ``w_k · R`` is whole, else ``MAX_ROUND`` by largest
remainders). Inside a round the sources are interleaved evenly (source k's i-th slot at time ``(i + ½) / c_k``),
so every prefix of the stream holds each source within one or two blocks of its share, and every whole round
exactly ``c_k``. Source k's n-th block is block ``n mod N_k`` of its own seeded permutation of epoch
``n // N_k``: a smaller source repeats (its epochs), as in The Pile. Everything is a pure function of
(seed, stream position), so the step sampler's resume is exact.

Validation serves each source's blocks in batches of that source only; the batch carries ``source`` (its
index) and :class:`SourceMetrics` sums loss, targets, NLL and bytes per source for ``val/<name>/loss``,
``val/<name>/ppl`` and ``val/<name>/bpb``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist

from lmkit.data.sampler import StepBatchSampler
from lmkit.data.sources import BUILTIN_CORPORA, Source
from lmkit.errors import ConfigError, DataError, LmkitError, did_you_mean

KEY = "data.mixture"
#: the keys of one mixture entry: a source (the top-level data.* source keys) plus its name and weight
MEMBER_KEYS = ("name", "source", "path", "weight", "text_field", "hf_builder", "doc_separator", "val_fraction",
               "val_path")
#: entry keys that default to the top-level data.* value
INHERITED = ("text_field", "hf_builder", "doc_separator", "val_fraction")
MAX_ROUND = 10_000
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_FORM = "[{source: text, path: a/, weight: 0.7}, {source: jsonl, path: b.jsonl, weight: 0.3}, ...]"


# -- config checks -------------------------------------------------------------------
def check_data_config(cfg) -> None:
    """``data.val_path`` and ``data.mixture`` of a DataConfig (called by its ``__post_init__``); normalizes both."""
    cfg.val_path = _check_path("data.val_path", cfg.val_path)
    if cfg.val_path is not None and cfg.source in BUILTIN_CORPORA:
        raise ConfigError(f"data.val_path is set, but data.source={cfg.source} is the built-in corpus, which splits "
                          f"off its own validation (data.val_fraction). Use data=text data.path=... with data.val_path, "
                          f"or set data.val_path=null")
    if cfg.mixture is None:
        if cfg.source == "mixture":
            raise ConfigError(f"data.source=mixture needs {KEY}={_FORM}")
        return
    if cfg.source != "mixture":
        raise ConfigError(f"{KEY} is set but data.source={cfg.source}: a mixture's sources are in its entries. "
                          f"Use data=mixture (data.source=mixture), or set {KEY}=null")
    if cfg.path not in (None, "", []):
        raise ConfigError(f"{KEY} and data.path={cfg.path!r} are both set: a mixture's paths are in its entries "
                          f"({_FORM}). Set data.path=null")
    if cfg.val_path is not None:
        raise ConfigError(f"{KEY} and data.val_path are both set: give each entry its own val_path "
                          f"({KEY}[i].val_path), or set data.val_path=null")
    cfg.mixture = check_mixture(cfg.mixture, cfg)


def _check_path(key: str, path):
    """A path or list of paths (a bare number is a file name), or None."""
    from lmkit.config.schema import check_path_length

    if path is None or path == "":
        return None
    if isinstance(path, (int, float)) and not isinstance(path, bool):
        path = str(path)
    items = [path] if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(items, (list, tuple)) or not items or not all(
            isinstance(p, (str, os.PathLike, int)) and not isinstance(p, bool) for p in items):
        raise ConfigError(f"{key} must be a file or directory, or a list of them, got {path!r}")
    for item in items:
        check_path_length(key, item)
    return path if isinstance(path, (str, os.PathLike)) else [str(p) for p in items]


def check_mixture(value, cfg) -> list[dict]:
    """``data.mixture`` as a list of complete entries (every key of :data:`MEMBER_KEYS`), names unique."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{KEY} must be a list of sources {_FORM}, got {value!r}")
    if not value:
        raise ConfigError(f"{KEY} is empty: list at least one source {_FORM}")
    entries, names = [], {}
    for i, entry in enumerate(value):
        where = f"{KEY}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a source {{source: ..., path: ..., weight: ...}}, got {entry!r}")
        for key in entry:
            if key not in MEMBER_KEYS:
                raise ConfigError(f"{where} has unknown key {key!r}.{did_you_mean(str(key), MEMBER_KEYS, cutoff=0.6)} "
                                  f"Keys of an entry: {', '.join(MEMBER_KEYS)}")
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{where} has no source: name its kind, e.g. {{source: text, path: a/, weight: 1}}")
        if source == "mixture":
            raise ConfigError(f"{where}.source=mixture: mixtures do not nest; list the sources of the inner mixture")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            got = "no weight" if weight is None else f"weight={weight!r}"
            raise ConfigError(f"{where} has {got}: a weight must be a number > 0 (its share of the training blocks "
                              f"is weight / the sum of the weights)")
        name = entry.get("name", f"{source}{i}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name={name!r} must be letters, digits, '_', '.' or '-' (it names the metrics "
                              f"val/<name>/loss)")
        if name in names:
            raise ConfigError(f"{where}.name={name!r} is also the name of {KEY}[{names[name]}]: names must differ "
                              f"(they name the metrics val/<name>/loss); set name: on one of them")
        names[name] = i
        path = _check_path(f"{where}.path", entry.get("path"))
        val_path = _check_path(f"{where}.val_path", entry.get("val_path"))
        if source in BUILTIN_CORPORA:
            for key, v in (("path", path), ("val_path", val_path)):
                if v is not None:
                    raise ConfigError(f"{where}.{key} is set, but source {source} is the built-in corpus: remove "
                                      f"{key} (it splits off data.val_fraction for validation)")
        elif path is None:
            raise ConfigError(f"{where} ({name}) has no path: give its file or directory, e.g. "
                              f"{{source: {source}, path: corpus/, weight: {weight}}}")
        full = {"name": name, "source": source, "path": path, "weight": float(weight), "val_path": val_path}
        for key in INHERITED:
            full[key] = entry.get(key, getattr(cfg, key))
        if not isinstance(full["text_field"], str) or not full["text_field"]:
            raise ConfigError(f"{where}.text_field must name the JSON field or column holding the text, got "
                              f"{full['text_field']!r}")
        vf = full["val_fraction"]
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 <= vf < 1:
            raise ConfigError(f"{where}.val_fraction must be in [0, 1), got {vf!r}")
        entries.append(full)
    return entries


def check_run(data, pm, objective_component) -> None:
    """What needs the registries or the objective (called by lmkit.config.validate): every entry's source is a
    registered dataset; the objective cuts blocks from packed text; one warning when val_path overrides
    val_fraction."""
    from lmkit.config.checks import serves_own_records

    own_data = serves_own_records(objective_component)
    for key, on in ((KEY, data.mixture is not None), ("data.val_path", data.val_path is not None)):
        if on and own_data:
            raise ConfigError(f"{key} needs an objective that cuts blocks from packed text; objective "
                              f"'{objective_component.name}' serves its own records or rows. Set {key}=null")
    if data.mixture is not None:
        if data.seq_len_schedule:
            raise ConfigError(f"data.seq_len_schedule cannot be combined with {KEY} (each phase would need its own "
                              f"blocks of every source): set data.seq_len_schedule=null")
        for i, entry in enumerate(data.mixture):
            try:
                pm.get("dataset", entry["source"])
            except LmkitError as e:
                raise ConfigError(f"{KEY}[{i}].source: {e}") from None
            if entry["source"] == "litdata":  # the run tokenizes every entry with its one tokenizer
                raise ConfigError(f"{KEY}[{i}].source=litdata: a mixture's entries are text sources (text, jsonl, hf, "
                                  f"the built-in corpus), tokenized with the run's one tokenizer; mixtures of litdata "
                                  f"stores are not supported. Mix the text, or write one store from all of it")
    if data.val_path is not None and data.val_fraction not in (0, 0.1):
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():  # inside the CLI's run: its pre-flight check already warned
                return
        except ImportError:
            pass
        from lmkit.plugins import warn

        warn(f"data.val_fraction={data.val_fraction} is ignored: data.val_path is set, so validation reads it and "
             f"training reads the whole of data.path")


# -- sources ---------------------------------------------------------------------------
@contextmanager
def renamed(prefix: str, path_key: str = "path"):
    """A DataError inside names ``<prefix>.<key>`` instead of ``data.<key>`` (``data.path`` as ``path_key``)."""
    try:
        yield
    except DataError as e:
        def sub(m):
            key = m.group(1)
            return f"{prefix}.{path_key if key == 'path' else key}"

        raise DataError(re.sub(r"\bdata\.(path|text_field|hf_builder)\b", sub, str(e))) from None


def build_val_source(cfg, component):
    """The source of ``data.val_path`` (same kind and settings as data.path), or None."""
    if cfg.val_path is None or getattr(cfg, "mixture", None) is not None:
        return None
    with renamed("data", "val_path"):
        return component.factory(dataclasses.replace(cfg, path=cfg.val_path, val_path=None))


@dataclasses.dataclass
class Member:
    """One entry of a mixture: its sources (training, optional validation) and settings."""

    index: int
    name: str
    weight: float
    val_fraction: float
    source: Source
    val_source: Source | None

    @property
    def key(self) -> str:
        return f"{KEY}[{self.index}]"


class MixtureSource(Source):
    """The entries of ``data.mixture`` (``members``); as one Source, the concatenation of their training text
    (what a trained tokenizer learns from)."""

    def __init__(self, cfg, pm=None):
        if pm is None:
            from lmkit.plugins import get_plugin_manager

            pm = get_plugin_manager()
        self.members = []
        for i, e in enumerate(cfg.mixture):
            sub = dataclasses.replace(cfg, mixture=None, source=e["source"], path=e["path"], val_path=None,
                                      **{k: e[k] for k in INHERITED})
            factory = pm.get("dataset", e["source"]).factory
            with renamed(f"{KEY}[{i}]"):
                source = factory(sub)
            val_source = None
            if e["val_path"] is not None:
                with renamed(f"{KEY}[{i}]", "val_path"):
                    val_source = factory(dataclasses.replace(sub, path=e["val_path"]))
            self.members.append(Member(i, e["name"], e["weight"], e["val_fraction"], source, val_source))

    def fingerprint(self) -> str:
        return "mixture[" + "|".join(m.source.fingerprint() for m in self.members) + "]"

    def documents(self):
        for m in self.members:
            with renamed(m.key):
                yield from m.source.documents()


# -- sampling --------------------------------------------------------------------------
def round_counts(weights, max_round: int = MAX_ROUND) -> np.ndarray:
    """Integer blocks per round for each weight: exact at the smallest round ``<= max_round`` where every
    normalized weight times the round is whole, else ``max_round`` split by largest remainders (each >= 1)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    rounds = np.arange(1, max_round + 1, dtype=np.float64)[:, None]
    x = rounds * w[None, :]
    whole = np.all(np.abs(x - np.round(x)) <= 1e-9 * rounds, axis=1) & np.all(np.round(x) >= 1, axis=1)
    if whole.any():
        return np.round(x[int(np.argmax(whole))]).astype(np.int64)
    ideal = w * max_round
    counts = np.maximum(np.floor(ideal).astype(np.int64), 1)
    order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
    i = 0
    while counts.sum() < max_round:
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > max_round:  # the >= 1 floor took blocks from the largest
        counts[np.argmax(counts)] -= 1
    return counts


class MixtureLayout:
    """Stream position -> (source, the source's n-th block) -> block index, as in the module docstring."""

    def __init__(self, weights, n_blocks, seed: int):
        self.counts = round_counts(weights)
        self.round = int(self.counts.sum())
        self.n_blocks = np.asarray(n_blocks, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_blocks)])
        self.seed = seed
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        sources = np.concatenate([np.full(c, k) for k, c in enumerate(self.counts)])
        ranks = np.concatenate([np.arange(c) for c in self.counts])
        order = np.argsort(times, kind="stable")  # ties: the lower source index first
        self.pattern, self.rank_in_round = sources[order], ranks[order]

    def shares(self) -> np.ndarray:
        """The realised share of each source: ``c_k / R``."""
        return self.counts / self.round

    def sources(self, positions: np.ndarray) -> np.ndarray:
        return self.pattern[np.asarray(positions) % self.round]

    @lru_cache(maxsize=16)
    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, source, epoch]).permutation(int(self.n_blocks[source]))

    def items(self, positions: np.ndarray) -> np.ndarray:
        """Global block indices (into the concatenated training blocks) of stream ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        r = positions % self.round
        src = self.pattern[r]
        n = (positions // self.round) * self.counts[src] + self.rank_in_round[r]
        epoch, i = np.divmod(n, self.n_blocks[src])
        out = np.empty_like(positions)
        for k, e in set(zip(src.tolist(), epoch.tolist())):
            sel = (src == k) & (epoch == e)
            out[sel] = self.offsets[k] + self._permutation(k, e)[i[sel]]
        return out


class MixtureStepBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler`'s stream positions (micro-batches, ranks, ramp, resume), each mapped to a block
    by :class:`MixtureLayout`."""

    def __init__(self, layout: MixtureLayout, micro_batch_size: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1, ramp_start: int = 1, ramp_steps: int = 0, start_step=lambda: 0):
        super().__init__(int(layout.n_blocks.sum()), micro_batch_size, grad_accum, seed, rank, world_size,
                         ramp_start, ramp_steps, start_step)
        self.layout = layout
        self.steps_per_epoch = max(1, self.steps_per_epoch)  # a loader "epoch": the blocks of all sources once

    def positions_for_step(self, step: int) -> np.ndarray:
        begin = self.stream_offset(step)
        m = np.arange(self.micro_batches_at(step))[:, None]
        row = np.arange(self.mbs)[None, :]
        return (begin + m * self.mbs * self.world_size + self.rank * self.mbs + row).ravel()

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        positions = self.positions_for_step(step)
        return list(zip(self.layout.items(positions).tolist(), positions.tolist()))


class MixtureValSampler:
    """Validation: each source's consecutive blocks in batches of that source only (at most ``max_batches`` per
    source), this rank's share of them; keys are global block indices."""

    def __init__(self, n_blocks, batch_size: int, max_batches: int | None, rank: int = 0, world_size: int = 1):
        offsets = np.concatenate([[0], np.cumsum(n_blocks)]).tolist()
        batches = []
        for k, n in enumerate(n_blocks):
            count = n // batch_size if not max_batches else min(n // batch_size, max_batches)
            batches += [range(offsets[k] + b * batch_size, offsets[k] + (b + 1) * batch_size) for b in range(count)]
        self.batches = batches[rank::world_size]

    def __iter__(self):
        for batch in self.batches:
            yield [(i, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class ConcatBlocks(torch.utils.data.Dataset):
    """Several :class:`BlockDataset` as one: global index -> (source, local index)."""

    def __init__(self, sets):
        self.sets = sets
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def __getitem__(self, key):
        index, position = key
        k = self.source_of(index)
        return self.sets[k][(int(index - self.offsets[k]), position)]


class SourceCollate:
    """The validation collate of a mixture: the batch (all of one source) gets ``source`` = its index, and the
    objective sees the blocks' positions within their source, as a run on that source alone would. (``key``:
    another name for the index, e.g. ``val_len`` for data.val_seq_lens' sets.)"""

    def __init__(self, collate, offsets, key: str = "source"):
        self.collate, self.offsets, self.key = collate, np.asarray(offsets), key

    def __call__(self, items):
        k = int(np.searchsorted(self.offsets, items[0][1], side="right") - 1)
        out = self.collate([(block, int(p - self.offsets[k])) for block, p in items])
        out[self.key] = k
        return out


# -- the data module's side --------------------------------------------------------------
class MixtureData:
    """A mixture's token caches, blocks, samplers and fingerprint, for :class:`LMDataModule`."""

    def __init__(self, dm):
        from lmkit.data.cache import load_tokens
        from lmkit.data.datamodule import BlockDataset, DataSplits, split_tokens

        if dm.stream_order:
            raise ConfigError(f"{KEY} cannot be combined with a model whose memory needs stream-ordered batches "
                              f"(model.memory_len > 0): set model.memory_len=0")
        self.members, self.splits = dm.source.members, []
        self.batch_size, self.val_batches = dm.cfg.batch_size, dm.val_batches
        train_sets, val_sets = [], []
        for m in self.members:
            with renamed(m.key):
                tokens = load_tokens(m.source, dm.tokenizer, dm.cache_dir)
            if m.val_source is not None:
                with renamed(m.key, "val_path"):
                    splits = DataSplits(train=tokens, val=load_tokens(m.val_source, dm.tokenizer, dm.cache_dir))
            else:
                splits = split_tokens(tokens, m.val_fraction)
            train, val = BlockDataset(splits.train, dm.block_len, dm.stride), BlockDataset(splits.val, dm.block_len,
                                                                                           dm.block_len)
            if len(train) == 0:
                raise DataError(f"{m.key} ({m.name}) is too small: its training split has {len(splits.train)} tokens, "
                                f"not one block of {dm.block_len}. Use more text, or lower data.seq_len.")
            if (m.val_source is not None or m.val_fraction > 0) and len(val) < dm.cfg.batch_size:
                fix = "use a larger val_path file" if m.val_source is not None else "raise its val_fraction"
                raise DataError(f"{m.key} ({m.name}): the validation split has {len(splits.val)} tokens, fewer than "
                                f"one batch of {dm.cfg.batch_size} blocks of {dm.block_len} tokens; {fix}.")
            self.splits.append(splits)
            train_sets.append(train)
            val_sets.append(val)
        self.train_set, self.val_set = ConcatBlocks(train_sets), ConcatBlocks(val_sets)
        self.layout = MixtureLayout([m.weight for m in self.members], [len(s) for s in train_sets], dm.seed)
        self.has_validation = len(self.val_set) > 0

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def train_sampler(self, cfg, seed: int, rank: int, world: int, start_step) -> MixtureStepBatchSampler:
        return MixtureStepBatchSampler(self.layout, cfg.batch_size, cfg.grad_accum, seed, rank, world,
                                       cfg.batch_ramp_start, cfg.batch_ramp_steps, start_step=start_step)

    def val_sampler(self, rank: int, world: int) -> MixtureValSampler:
        return MixtureValSampler([len(s) for s in self.val_set.sets], self.batch_size, self.val_batches, rank, world)

    def val_collate(self, collate) -> SourceCollate:
        return SourceCollate(collate, self.val_set.offsets)

    def fingerprint(self, dm) -> dict:
        """As :meth:`LMDataModule.fingerprint`, per source; ``data.mixture`` (names and realised shares) decides
        the order too."""
        from lmkit.data.datamodule import tokens_digest

        digests = lambda part: "; ".join(f"{m.name}: {tokens_digest(getattr(s, part))}"  # noqa: E731
                                         for m, s in zip(self.members, self.splits))
        return {
            "corpus": digests("train"), "val_corpus": digests("val"), "seed": dm.seed, "data.seq_len": dm.seq_len,
            "data.seq_len_schedule": None, "tokenizer": dm.tokenizer.fingerprint(),
            "data.val_fraction": [m.val_fraction for m in self.members],
            "data.mixture": [[m.name, round(float(s), 12)] for m, s in zip(self.members, self.layout.shares())],
            # not compared: they only tell which setting changed the corpus
            "data.source": "mixture", "data.path": [_abspaths(m.source) for m in self.members],
        }

    def metrics(self, scores_every_byte: bool) -> "SourceMetrics":
        return SourceMetrics(self.names, scores_every_byte)


def _abspaths(source) -> list[str] | None:
    files = getattr(source, "files", None)
    return None if files is None else [os.path.abspath(str(f)) for f in files]


# -- per-source validation metrics ---------------------------------------------------------
class SourceMetrics:
    """Per-source sums of (loss, targets, NLL, bytes) over a validation epoch, summed over ranks at its end."""

    def __init__(self, names: list[str], scores_every_byte: bool):
        self.names, self.scores_every_byte = names, scores_every_byte
        self.sums: torch.Tensor | None = None
        self.has_nll = False

    def update(self, source: int, out) -> None:
        if self.sums is None:
            self.sums = torch.zeros(len(self.names), 4, dtype=torch.float64, device=out.loss_sum.device)
        row = [out.loss_sum, out.n_targets]
        if out.nll_sum is not None:
            self.has_nll = True
            row += [out.nll_sum, out.n_bytes]
        self.sums[source, :len(row)] += torch.stack([v.detach().to(torch.float64) for v in row])

    def log(self, module) -> dict:
        """Log ``val/<name>/loss`` (and ``ppl``, ``bpb``) of the epoch on ``module``; reset; return them."""
        sums = self.sums if self.sums is not None else torch.zeros(len(self.names), 4, dtype=torch.float64,
                                                                   device=module.device)
        has_nll = torch.tensor([float(self.has_nll)], device=sums.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(has_nll, op=dist.ReduceOp.MAX)
        self.sums, self.has_nll = None, False
        logged = {}
        for name, (loss, targets, nll, n_bytes) in zip(self.names, sums.tolist()):
            if targets <= 0:
                continue
            logged[f"val/{name}/loss"] = loss / targets
            if has_nll.item() and n_bytes > 0:
                logged[f"val/{name}/ppl"] = math.exp(min(nll / targets, 30.0))
                if self.scores_every_byte:
                    logged[f"val/{name}/bpb"] = nll / (n_bytes * math.log(2))
        for key, value in logged.items():
            module.log(key, torch.tensor(value, dtype=torch.float32), sync_dist=False)
        return logged
