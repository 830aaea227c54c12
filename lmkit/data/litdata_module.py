"""``data=litdata``: training streamed from a litdata token store by litdata's StreamingDataset/StreamingDataLoader.

The store (:mod:`lmkit.data.litdata_store`) is local or in object storage. litdata distributes its chunks over
ranks and dataloader workers, shuffles them (chunk order and items within a window) with ``seed`` per epoch,
and keeps each rank's position: :class:`StepStreamingLoader`'s ``state_dict`` is saved in Lightning's
checkpoints and restored on resume, so a resumed run reads exactly the batches the uninterrupted run would have.

One loader batch is one optimizer step of this rank: ``batch_size × grad_accum`` blocks of ``block_len`` tokens,
split into micro-batches by :class:`lmkit.data.datamodule.StepCollate`. Each block carries a key, its index in
the store plus the epoch times the number of blocks, that seeds the objective's noise: the same block gets the
same noise in the same epoch whatever the number of ranks or workers, and other noise in the next epoch.

Blocks never overlap (TokensLoader): where an objective's windows share a token (causal LM reads ``seq_len + 1``
tokens every ``seq_len``), the prediction across two blocks is not trained, one target in ``seq_len + 1``, as in
litgpt's litdata pipelines.

Validation reads the store's ``val/`` split by index (map-style), in the fixed consecutive batches every other
source uses (:class:`lmkit.data.sampler.SequentialBatchSampler`).

litdata reads ranks from torch.distributed when the dataset is created, so the training dataset is created in
``train_dataloader`` (after Lightning set up the process group), never earlier.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from lmkit.data.datamodule import LMDataModule
from lmkit.data.sampler import SequentialBatchSampler
from lmkit.errors import DataError


def _streaming_classes():
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    class KeyedTokens(StreamingDataset):
        """Blocks as ``(int64 tokens, key)``; the key seeds the block's noise (see the module docstring)."""

        def __init__(self, *args, n_blocks: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.n_blocks = n_blocks

        def __getitem__(self, index):
            block = super().__getitem__(index)
            i = getattr(index, "index", index)
            return block.to(torch.int64), (self.current_epoch - 1) * self.n_blocks + int(i)

    class StepStreamingLoader(StreamingDataLoader):
        """litdata's loader; its state (per-worker positions, epoch) is what Lightning checkpoints."""

    return KeyedTokens, StepStreamingLoader, TokensLoader, StreamingDataset


def _import_litdata():
    import logging

    # litdata logs each dataset's cache and mmap choices at INFO (Hydra's logging shows INFO): keep warnings only
    logging.getLogger("litdata").setLevel(logging.WARNING)
    try:
        return _streaming_classes()
    except ImportError as e:
        raise DataError(f"data=litdata needs Lightning's litdata ({e.name or e}): pip install --no-deps "
                        f"'litdata>=0.2.60,<0.3' (its other dependencies come with pip install 'lmkit[litdata]'; "
                        f"--no-deps keeps pip from replacing torch for torchvision)") from None


class _ValBlocks(Dataset):
    """The validation split read by block index: ``(tokens, position)`` for the step collator."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, position = key
        return self.dataset[int(index)][0], position


class LitdataDataModule(LMDataModule):
    """An :class:`LMDataModule` whose data is a litdata store (``source``: a LitdataStore)."""

    def prepare(self) -> None:
        if getattr(self, "_prepared", False):
            return
        store = self.source
        if self.stream_order:
            from lmkit.errors import ConfigError

            raise ConfigError("data=litdata shuffles blocks; a model with recurrence memory (model.memory_len > 0) "
                              "needs them in stream order: set model.memory_len=0 or use data=text")
        store.check_tokenizer(self.tokenizer)
        self.n_train = store.blocks("train", self.block_len)
        world = self._world()[1]
        need = self.cfg.batch_size * self.cfg.grad_accum * world
        if self.n_train < need:
            raise DataError(f"litdata store '{store.path}' is too small: {self.n_train} training blocks of "
                            f"{self.block_len} tokens, but one optimizer step needs {need} (batch_size "
                            f"{self.cfg.batch_size} × grad_accum {self.cfg.grad_accum} × {world} ranks). Use more text, "
                            f"or lower data.seq_len / data.batch_size")
        self.n_val = store.blocks("val", self.block_len) if store.has_validation else 0
        if store.has_validation and self.n_val < self.cfg.batch_size:
            raise DataError(f"the validation split of litdata store '{store.path}' has {self.n_val} blocks of "
                            f"{self.block_len} tokens, fewer than one batch of {self.cfg.batch_size}: write the store "
                            f"with a larger data.val_fraction or data.val_path")
        _import_litdata()
        self.train_set = None  # created by train_dataloader, once torch.distributed is set up
        self.val_set = None
        self._prepared = True

    @property
    def has_validation(self) -> bool:
        return self.source.has_validation

    def fingerprint(self) -> dict:
        self.prepare()
        meta = self.source.meta
        return {
            "corpus": meta.get("digests", {}).get("train"), "seed": self.seed, "data.seq_len": self.seq_len,
            "data.seq_len_schedule": None, "data.val_fraction": meta.get("val_fraction"),
            "tokenizer": self.tokenizer.fingerprint(),
            "data.source": "litdata", "data.path": [self.source.root],
            **({"val_corpus": meta.get("digests", {}).get("val")} if self.source.has_validation else {}),
        }

    def _streaming(self, split: str, shuffle: bool, n_blocks: int):
        KeyedTokens, _, TokensLoader, _ = _import_litdata()
        store = self.source
        return KeyedTokens(store.split_dir(split), cache_dir=store.cache_dir() if store.remote else None,
                           item_loader=TokensLoader(block_size=self.block_len), shuffle=shuffle, seed=self.seed,
                           drop_last=True, n_blocks=n_blocks)

    def train_dataloader(self) -> DataLoader:
        _, StepStreamingLoader, _, _ = _import_litdata()
        self.train_set = self._streaming("train", True, self.n_train)
        return StepStreamingLoader(
            self.train_set, batch_size=self.cfg.batch_size * self.cfg.grad_accum, collate_fn=self.collate,
            num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if not self.source.has_validation:
            return []
        if self.val_set is None:
            self.val_set = _ValBlocks(self._streaming("val", False, self.n_val), self.n_val)
        rank, world = self._world()
        return self._loader(self.val_set, SequentialBatchSampler(self.n_val, self.cfg.batch_size, self.val_batches,
                                                                 rank, world))
