"""The faiss index of a retrieval store: its settings (:class:`IndexSpec`), building and searching.

Every kind indexes unit-length keys (:mod:`lmkit_retrieval.keys`) with the inner-product metric,
so scores are cosine similarities of the keys: ``flat`` (``IndexFlatIP``, exact), ``ivfpq``
(``IndexIVFPQ`` over a flat inner-product quantizer, trained on a sample; approximate) and ``hnsw`` (``IndexHNSWFlat``,
no training; approximate).

Threads: torch and faiss may share one OpenMP runtime (torch imported first) or not (faiss
first), so :func:`set_threads` sets both explicitly; :func:`faiss_module` imports faiss after
torch and gives it torch's thread count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from lmkit.config.checks import check_choice, check_int
from lmkit.errors import ConfigError, did_you_mean

INDEX_KINDS = ("flat", "ivfpq", "hnsw")
_ADD_BLOCK = 65536  # vectors normalised and added at a time (bounds the extra memory of a build)


def faiss_module():
    """``faiss``, imported after torch, with torch's thread count."""
    import torch
    import faiss

    if not getattr(faiss, "_lmkit_threads_set", False):
        faiss.omp_set_num_threads(torch.get_num_threads())
        faiss._lmkit_threads_set = True
    return faiss


def set_threads(n: int) -> None:
    """Use ``n`` threads in both torch and faiss (they may or may not share an OpenMP runtime)."""
    import torch

    check_int("threads", n, minimum=1)
    torch.set_num_threads(n)
    faiss = faiss_module()
    faiss.omp_set_num_threads(n)


@dataclass
class IndexSpec:
    """Index settings. ``kind``: flat | ivfpq | hnsw.

    ivfpq: ``nlist`` inverted lists (None = ``4·√n``, at most n/39 so that k-means has 39
    points per centroid, as faiss asks), ``m`` sub-quantizers (None = the largest of
    64, 32, …, 1 that divides d and is at most d/2), ``nbits`` bits per code, ``nprobe``
    lists visited per query, ``train_size`` vectors sampled (seeded) for training.
    hnsw: ``M`` links per node, ``ef_construction``, ``ef_search`` (raised to the number of
    results asked for when that is larger).
    """

    kind: str = "flat"
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    nprobe: int = 8
    train_size: int = 65536
    M: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    seed: int = 1234

    def check(self) -> "IndexSpec":
        check_choice("index", self.kind, INDEX_KINDS)
        check_int("nlist", self.nlist, minimum=1, optional=True)
        check_int("m", self.m, minimum=1, optional=True)
        check_int("nbits", self.nbits, minimum=1, maximum=16)
        check_int("nprobe", self.nprobe, minimum=1)
        check_int("train_size", self.train_size, minimum=1)
        check_int("M", self.M, minimum=2)
        check_int("ef_construction", self.ef_construction, minimum=1)
        check_int("ef_search", self.ef_search, minimum=1)
        check_int("seed", self.seed)
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "IndexSpec":
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown index setting '{key}'.{did_you_mean(key, known)} "
                                  f"Settings: {', '.join(known)}")
        return cls(**data).check()

    def as_dict(self) -> dict:
        return asdict(self)

    def resolved(self, n: int, d: int) -> "IndexSpec":
        """The settings with ``nlist``/``m`` filled in for ``n`` vectors of dimension ``d``; a combination faiss
        cannot train (m not dividing d, fewer vectors than centroids) is a ConfigError."""
        spec = IndexSpec(**self.as_dict())
        if spec.kind != "ivfpq":
            return spec
        if spec.m is None:
            spec.m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= max(1, d // 2))
        if d % spec.m:
            divisors = [m for m in range(1, d + 1) if d % m == 0]
            raise ConfigError(f"m={spec.m} does not divide the embedding size d={d}; choose one of "
                              f"{divisors[:12]}{' …' if len(divisors) > 12 else ''}")
        if spec.nlist is None:
            spec.nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        need = max(spec.nlist, 2 ** spec.nbits)
        if min(n, spec.train_size) < need:
            raise ConfigError(f"index=ivfpq with nlist={spec.nlist}, nbits={spec.nbits} needs at least {need} training "
                              f"vectors, the store has {n} chunks (train_size={spec.train_size}); lower nlist/nbits "
                              f"or use index=flat")
        return spec


def build_index(vectors: np.ndarray, spec: IndexSpec, keys=None):
    """A faiss index over ``vectors`` [n, d] (any float array, e.g. a memmap), turned into unit-length keys block
    by block by ``keys`` (a function of a block; default :func:`normalized`)."""
    keys = keys or normalized
    faiss = faiss_module()
    n, d = vectors.shape
    spec = spec.resolved(n, d)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec.seed
        index.pq.cp.seed = spec.seed
        rng = np.random.default_rng(spec.seed)
        sample = np.sort(rng.choice(n, size=min(n, spec.train_size), replace=False))
        index.train(keys(vectors[sample]))
        index.nprobe = spec.nprobe
    for start in range(0, n, _ADD_BLOCK):
        index.add(keys(vectors[start:start + _ADD_BLOCK]))
    return index


def normalized(x) -> np.ndarray:
    """A float32 C-contiguous copy of ``x`` with unit L2 rows (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def search_params(index, spec: IndexSpec, fetch: int):
    """faiss search parameters for ``fetch`` results per query (None for a flat index)."""
    faiss = faiss_module()
    if spec.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(spec.ef_search, fetch))
    if spec.kind == "ivfpq":
        return faiss.SearchParametersIVF(nprobe=min(spec.nprobe, index.nlist))
    return None
