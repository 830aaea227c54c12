"""``retro_lm``: causal LM on the ``retro`` decoder with neighbours retrieved from a datastore (RETRO §2).

Every chunk ``C_u = input_ids[:, u·m : (u+1)·m]`` of a block gets the store's ``k`` nearest
chunks to its own embedding (and their continuations), excluding by default every chunk of the
block's own document(s). The neighbours of every block the run reads are precomputed once
(:mod:`lmkit_retrieval.neighbours`, cached under ``data.cache_dir``); the collator gathers their
tokens by the block's index, so they are a pure function of the block and resume is exact.

The objective brings its own data module (``example_based``): an :class:`LMDataModule` whose
blocks carry their split and index to the collator, which the plain one does not pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkit.data.datamodule import _SEED_STRIDE, LMDataModule
from lmkit.errors import ConfigError
from lmkit.objectives.base import Collator, LossOutput, check_chunked_ce
from lmkit.objectives.causal_lm import CausalLM, CausalLMCollator


@dataclass
class RetroLMConfig:
    """Options of ``retro_lm``.

    ``store``: a retrieval store directory (``python -m lmkit retrieval build``) built with the
    run's tokenizer and with ``chunk_len`` = ``model.chunk_len``. ``k``: neighbours per chunk
    (= ``model.n_neighbours``). ``exclude_same_document``: never retrieve a chunk whose value
    overlaps the query chunk's document(s) (RETRO's training rule; the store must then hold the
    run's own corpus, from its start). ``val_exclude_same_document``: the rule for validation blocks
    (null = the same as training); false with a store that holds the validation text measures the
    leakage effect RETRO analyses (§4.4). ``chunked_ce``: as causal_lm's.
    """

    name: str = "retro_lm"
    store: str | None = None
    k: int = 2
    exclude_same_document: bool = True
    val_exclude_same_document: bool | None = None
    chunked_ce: int = 0

    def __post_init__(self):
        if not self.store:
            raise ConfigError("objective.store is required: a retrieval store directory, e.g. "
                              "objective.store=stores/shakespeare (build one with python -m lmkit retrieval build)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"objective.k must be an integer >= 1 (neighbours per chunk), got {self.k!r}")
        check_chunked_ce(self.chunked_ce)


class RetroCollator(Collator):
    """Causal-LM inputs plus ``neighbours`` int64 [B, l, k, 2m] and ``neighbour_mask`` bool of the same shape.

    Picklable: holds paths only; the store's chunks and the neighbour tables are opened
    (memory-mapped) on first use in each worker.
    """

    def __init__(self, store_path: str, tables: dict[str, str]):
        self.store_path, self.tables = store_path, tables
        self._store, self._open = None, {}

    def __getstate__(self):
        return {"store_path": self.store_path, "tables": self.tables}

    def __setstate__(self, state):
        self.__init__(state["store_path"], state["tables"])

    def neighbour_ids(self, split: str, index: np.ndarray) -> np.ndarray:
        """int64 [B, l, k]: the precomputed neighbour chunk ids of blocks ``index`` of ``split`` (-1: none)."""
        if split not in self._open:
            self._open[split] = np.load(self.tables[split], mmap_mode="r")
        return np.asarray(self._open[split][index], dtype=np.int64)

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator, keys=None) -> dict[str, torch.Tensor]:
        if keys is None:
            raise ConfigError("retro_lm batches need their blocks' split and index (they come from retro_lm's own data "
                              "module); this caller cut blocks itself")
        if self._store is None:
            from lmkit_retrieval.store import Datastore

            self._store = Datastore.open(self.store_path)
        out = CausalLMCollator()(blocks, gen)
        split = keys[0][0]
        ids = self.neighbour_ids(split, np.asarray([i for _, i in keys], dtype=np.int64))
        values = self._store.neighbours(ids)  # [B, l, k, 2m]
        pad = self._store.manifest["pad_id"]
        out["neighbours"] = torch.from_numpy(values)
        out["neighbour_mask"] = torch.from_numpy((values != pad) & (ids >= 0)[..., None])
        return out


class KeyedBlocks(torch.utils.data.Dataset):
    """A block dataset whose items also carry ``(split, index)`` for :class:`RetroCollator`."""

    def __init__(self, blocks, split: str):
        self.blocks, self.split = blocks, split

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key):
        block, position = self.blocks[key]
        return (block, (self.split, key[0])), position


class RetroStepCollate:
    """:class:`lmkit.data.datamodule.StepCollate` for keyed blocks: the collator also gets each block's key."""

    def __init__(self, collator: RetroCollator, micro_batch_size: int, seed: int):
        self.collator, self.mbs, self.seed = collator, micro_batch_size, seed

    def __call__(self, items):
        blocks = torch.stack([b for (b, _), _ in items])
        keys = [k for (_, k), _ in items]
        positions = [p for _, p in items]
        micro = []
        for m in range(0, len(items), self.mbs):
            gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + positions[m])
            micro.append(self.collator(blocks[m:m + self.mbs], gen, keys[m:m + self.mbs]))
        return {"micro_batches": micro}


class RetroDataModule(LMDataModule):
    """:class:`LMDataModule` whose batches carry the precomputed neighbours of their blocks' chunks."""

    def prepare(self) -> None:
        if self.splits is not None:
            return
        super().prepare()
        from lmkit_retrieval.neighbours import cached_tables

        obj = self.objective
        splits = {"train": (self.splits.train, len(self.train_set), self.stride),
                  "val": (self.splits.val, len(self.val_set), self.val_set.stride)}
        val_rule = obj.cfg.val_exclude_same_document
        rules = {"train": obj.cfg.exclude_same_document,
                 "val": obj.cfg.exclude_same_document if val_rule is None else bool(val_rule)}
        tables = cached_tables(obj.store, self.cache_dir, splits, self.seq_len, obj.cfg.k, rules, obj.eos_id)
        self.train_set = KeyedBlocks(self.train_set, "train")
        self.val_set = KeyedBlocks(self.val_set, "val")
        self.collate = RetroStepCollate(RetroCollator(str(obj.store.path), tables), self.cfg.batch_size, self.seed)


class RetroLM(CausalLM):
    """Next-token cross-entropy of the ``retro`` decoder reading each chunk's retrieved neighbours."""

    kinds = ("decoder",)
    needs = frozenset({"neighbours"})
    example_based = True  # brings its own data module (RetroDataModule): blocks with their keys

    def __init__(self, cfg: RetroLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        from lmkit_retrieval.store import Datastore

        self.store = Datastore.open(cfg.store)
        self.store.check_compatible(tokenizer)
        if cfg.k > self.store.n_chunks:
            raise ConfigError(f"objective.k={cfg.k} is larger than the retrieval store '{cfg.store}' "
                              f"({self.store.n_chunks} chunks); set objective.k <= {self.store.n_chunks}")

    def make_collator(self) -> RetroCollator:
        """A collator without neighbour tables: :class:`RetroDataModule` gives it the tables it computes."""
        return RetroCollator(str(self.store.path), {})

    def make_datamodule(self, run, source, tokenizer, cache_dir, data_steps=lambda: 0) -> RetroDataModule:
        self._check_run(run)
        return RetroDataModule(run.data, source, tokenizer, self, run.data.seq_len, run.seed, Path(cache_dir),
                               run.trainer.val_batches, data_steps=data_steps)

    def _check_run(self, run) -> None:
        """The model's chunk grid and neighbour shape must be the store's; blocks must start on chunk boundaries."""
        m, seq_len, model = self.store.chunk_len, run.data.seq_len, run.model
        if getattr(model, "chunk_len", m) != m:
            raise ConfigError(f"model.chunk_len={model.chunk_len} differs from the chunk_len={m} of the retrieval store "
                              f"'{self.store.path}'; set model.chunk_len={m} or build a store with chunk_len="
                              f"{model.chunk_len}")
        if seq_len % m:
            raise ConfigError(f"data.seq_len={seq_len} must be a multiple of the store's chunk_len={m} (blocks must "
                              f"start on chunk boundaries); set data.seq_len={max(m, seq_len // m * m)}")
        if getattr(model, "n_neighbours", self.cfg.k) != self.cfg.k:
            raise ConfigError(f"objective.k={self.cfg.k} differs from model.n_neighbours={model.n_neighbours}; "
                              f"set both to the same number")
        r = getattr(model, "neighbour_len", None)
        if r is not None and r < 2 * m:
            raise ConfigError(f"model.neighbour_len={r} is shorter than the store's neighbours (2·chunk_len = {2 * m} "
                              f"tokens); set model.neighbour_len=null")

    def loss(self, model, batch) -> LossOutput:
        hidden = model(batch["input_ids"], padding_mask=batch.get("padding_mask"), neighbours=batch["neighbours"],
                       neighbour_mask=batch["neighbour_mask"])
        return self.lm_head_nll(model, hidden, batch["labels"], self.cfg.chunked_ce)
