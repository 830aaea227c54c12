"""The LightningDataModule: corpus -> token cache -> blocks -> objective's collator."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmkit.data.cache import load_tokens
from lmkit.data.sampler import SequentialBatchSampler, StepBatchSampler
from lmkit.data.sampler import StreamSequentialBatchSampler, StreamStepBatchSampler
from lmkit.data.seq_len_schedule import SeqLenSchedule
from lmkit.errors import DataError
from lmkit.strategies import data_parallel_world

_SEED_STRIDE = 1_000_003


class BlockDataset(Dataset):
    """Windows of ``block_len`` tokens every ``stride`` tokens of a packed token array."""

    def __init__(self, tokens: np.ndarray, block_len: int, stride: int):
        self.tokens, self.block_len, self.stride = tokens, block_len, stride
        self.n = max(0, (len(tokens) - block_len) // stride + 1) if len(tokens) >= block_len else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, position = key
        start = index * self.stride
        block = torch.from_numpy(np.asarray(self.tokens[start:start + self.block_len], dtype=np.int64))
        return block, position


class StepCollate:
    """Stacks a step's blocks, splits them into micro-batches and applies the objective's collator."""

    def __init__(self, collator, micro_batch_size: int, seed: int):
        self.collator, self.mbs, self.seed = collator, micro_batch_size, seed

    def __call__(self, items):
        blocks = torch.stack([b for b, _ in items])
        positions = [p for _, p in items]
        micro = []
        for m in range(0, len(items), self.mbs):
            gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + positions[m])
            micro.append(self.collator(blocks[m:m + self.mbs], gen))
        return {"micro_batches": micro}


class StepDataLoader(DataLoader):
    """The training loader: its position (the batch sampler's) is saved in checkpoints.

    Lightning restores a loader with ``state_dict``/``load_state_dict`` (a "resumable" loader)
    on resume. The data order itself is a pure function of (seed, step), so the state is one
    number: the steps' worth of batches consumed.
    """

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


@dataclass
class DataSplits:
    train: np.ndarray
    val: np.ndarray


def split_tokens(tokens: np.ndarray, val_fraction: float) -> DataSplits:
    """Last ``val_fraction`` of the packed stream is validation."""
    n_val = int(len(tokens) * val_fraction)
    return DataSplits(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val:])


def tokens_digest(tokens: np.ndarray, windows: int = 1024, width: int = 256) -> str:
    """``"N tokens, sha256 H"`` of a token array: all of it when small, else ``windows`` evenly spaced windows."""
    n = len(tokens)
    h = hashlib.sha256(str(n).encode())
    if n <= windows * width:
        h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    else:
        for i in range(windows):
            start = i * (n - width) // (windows - 1)
            h.update(np.asarray(tokens[start:start + width], dtype=np.int64).tobytes())
    return f"{n} tokens, sha256 {h.hexdigest()[:16]}"


class LMDataModule(L.LightningDataModule):
    """Serves step batches for training and fixed batches for validation.

    ``data_steps`` (a callable) gives the number of optimizer steps already consumed, read
    when each epoch's iteration starts, so resumed runs continue mid-epoch exactly.
    """

    def __init__(self, data_cfg, source, tokenizer, objective, seq_len: int, seed: int, cache_dir: Path,
                 val_batches: int | None, data_steps=lambda: 0, stream_order: bool = False, val_source=None):
        super().__init__()
        self.cfg, self.source, self.tokenizer, self.objective = data_cfg, source, tokenizer, objective
        self.seq_len, self.seed, self.cache_dir, self.val_batches = seq_len, seed, cache_dir, val_batches
        self.data_steps = data_steps
        # a model with recurrence memory (its ``stream_order``): row r of each micro-batch continues row r
        # of the previous one, in training and validation (lmkit.data.sampler.StreamStepBatchSampler)
        self.stream_order = stream_order
        if stream_order and getattr(data_cfg, "seq_len_schedule", None):
            from lmkit.errors import ConfigError

            raise ConfigError("data.seq_len_schedule cannot be combined with a model whose memory needs stream-ordered "
                              "batches (model.memory_len > 0): set data.seq_len_schedule=null or model.memory_len=0")
        self.block_len, self.stride = objective.block_layout(seq_len)
        schedule = getattr(data_cfg, "seq_len_schedule", None)  # earlier phases at other lengths (validation: seq_len)
        self.seq_len_schedule = SeqLenSchedule(schedule, seq_len, objective) if schedule else None
        self.collate = StepCollate(objective.make_collator(), data_cfg.batch_size, seed)
        self.splits: DataSplits | None = None
        self.val_source = val_source  # data.val_path's source (lmkit.data.mixture.build_val_source), or None
        self.mixture = None  # data.mixture's blocks and samplers (lmkit.data.mixture.MixtureData)
        self.val_lengths = getattr(data_cfg, "val_seq_lens", None)  # more validation lengths (lmkit.data.val_lengths)
        if stream_order and self.val_lengths:
            from lmkit.errors import ConfigError

            raise ConfigError("data.val_seq_lens cannot be combined with a model whose memory needs stream-ordered "
                              "batches (model.memory_len > 0): set data.val_seq_lens=null or model.memory_len=0")

    def prepare(self) -> None:
        """Tokenize (or load the cache) and check there is enough data; idempotent."""
        if self.splits is not None or self.mixture is not None:
            return
        if getattr(self.source, "members", None) is not None:  # data.mixture
            from lmkit.data.mixture import MixtureData

            self.mixture = MixtureData(self)
            self.train_set, self.val_set = self.mixture.train_set, self.mixture.val_set
            return
        tokens = load_tokens(self.source, self.tokenizer, self.cache_dir)
        if self.val_source is not None:  # data.val_path: training reads all of data.path
            from lmkit.data.mixture import renamed

            with renamed("data", "val_path"):
                self.splits = DataSplits(train=tokens, val=load_tokens(self.val_source, self.tokenizer, self.cache_dir))
        else:
            self.splits = split_tokens(tokens, self.cfg.val_fraction)
        self.train_set = BlockDataset(self.splits.train, self.block_len, self.stride)
        # stream order: each validation segment continues the previous one (the memory's context), as in training
        self.val_set = BlockDataset(self.splits.val, self.block_len, self.stride if self.stream_order else self.block_len)
        world = self._world()[1]
        need = self.cfg.batch_size * self.cfg.grad_accum * world
        if len(self.train_set) < need:
            raise DataError(
                f"the corpus is too small: its training split has {len(self.splits.train)} tokens, "
                f"{len(self.train_set)} blocks of {self.block_len} tokens, but one optimizer step needs {need} blocks "
                f"(batch_size {self.cfg.batch_size} × grad_accum {self.cfg.grad_accum} × {world} ranks). "
                f"Use more text, or lower data.seq_len / data.batch_size."
            )
        if self.seq_len_schedule is not None:  # training blocks of each phase's length
            self.train_set = self.seq_len_schedule.train_set(
                self.splits.train, need, f"batch_size {self.cfg.batch_size} × grad_accum {self.cfg.grad_accum} × {world} ranks")
        if self.has_validation and len(self.val_set) < self.cfg.batch_size:
            fix = "Use a larger data.val_path" if self.val_source is not None else "Raise data.val_fraction or use more text"
            raise DataError(
                f"the validation split has {len(self.splits.val)} tokens, fewer than one batch of "
                f"{self.cfg.batch_size} blocks of {self.block_len} tokens. {fix}."
            )
        if self.val_lengths and self.has_validation:  # data.val_seq_lens: one more set of blocks per length
            from lmkit.data.mixture import ConcatBlocks
            from lmkit.data.val_lengths import length_sets

            self.val_set = ConcatBlocks([self.val_set] + length_sets(self.splits.val, self.objective, self.val_lengths,
                                                                     self.cfg.batch_size))

    @property
    def has_validation(self) -> bool:
        """Whether validation has data: data.val_fraction > 0, data.val_path, or a mixture entry's."""
        if self.mixture is not None:
            return self.mixture.has_validation
        return self.val_source is not None or self.cfg.val_fraction > 0

    def fingerprint(self) -> dict:
        """What the data order of a run depends on; saved in checkpoints, compared on resume.

        ``corpus`` identifies the training split's tokens (their count and a hash of them, of
        1024 evenly spaced windows for large corpora): a corpus moved elsewhere keeps it, another
        corpus, an edited one or another tokenizer changes it. The other entries are settings.
        The batch layout is not among them: the loader's state holds the stream position, so a
        resume with another batch size or number of ranks continues the same stream.
        """
        self.prepare()
        if self.mixture is not None:
            return self.mixture.fingerprint(self)
        cfg = self.cfg
        paths = cfg.path if isinstance(cfg.path, (list, tuple)) or cfg.path is None else [cfg.path]
        return {
            "corpus": tokens_digest(self.splits.train), "seed": self.seed, "data.seq_len": self.seq_len,
            "data.seq_len_schedule": self.seq_len_schedule.fingerprint() if self.seq_len_schedule else None,
            "data.val_fraction": cfg.val_fraction, "tokenizer": self.tokenizer.fingerprint(),
            # not compared: they only tell which setting changed the corpus
            "data.source": cfg.source, "data.path": None if paths is None else [os.path.abspath(os.path.expanduser(str(p)))
                                                                             for p in paths],
            "data.text_field": cfg.text_field, "data.doc_separator": cfg.doc_separator, "data.hf_builder": cfg.hf_builder,
            **({"val_corpus": tokens_digest(self.splits.val), "data.val_path": _abspaths(cfg.val_path)}
               if self.val_source is not None else {}),
        }

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _world(self) -> tuple[int, int]:
        """(rank, size) among the data-parallel replicas: tensor-parallel peers read the same data."""
        return data_parallel_world(self.trainer)

    def _loader(self, dataset, batch_sampler, cls=DataLoader, collate=None) -> DataLoader:
        return cls(
            dataset, batch_sampler=batch_sampler, collate_fn=collate or self.collate, num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0, pin_memory=torch.cuda.is_available(),
            # its own generator: creating an iterator must not draw from the global RNG, which
            # dropout uses and checkpoints restore
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_sampler(self) -> StepBatchSampler:
        rank, world = self._world()
        if getattr(self, "mixture", None) is not None:
            return self.mixture.train_sampler(self.cfg, self.seed, rank, world, self.data_steps)
        if getattr(self, "stream_order", False):
            return StreamStepBatchSampler(len(self.train_set), self.cfg.batch_size, self.cfg.grad_accum, self.seed, rank,
                                          world, self.cfg.batch_ramp_start, self.cfg.batch_ramp_steps,
                                          start_step=self.data_steps)
        if getattr(self, "seq_len_schedule", None) is not None:
            return self.seq_len_schedule.sampler(self.train_set, self.cfg, self.seed, rank, world, self.data_steps)
        return StepBatchSampler(
            len(self.train_set), self.cfg.batch_size, self.cfg.grad_accum, self.seed, rank, world,
            self.cfg.batch_ramp_start, self.cfg.batch_ramp_steps, start_step=self.data_steps,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler(), StepDataLoader)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        if getattr(self, "mixture", None) is not None:  # batches of one source each, tagged with its index
            return self._loader(self.val_set, self.mixture.val_sampler(rank, world), collate=self.mixture.val_collate(
                self.collate))
        if getattr(self, "val_lengths", None):  # batches of one length each, tagged val_len = its set's index
            from lmkit.data.mixture import MixtureValSampler, SourceCollate

            sampler = MixtureValSampler([len(s) for s in self.val_set.sets], self.cfg.batch_size, self.val_batches,
                                        rank, world)
            return self._loader(self.val_set, sampler, collate=SourceCollate(self.collate, self.val_set.offsets,
                                                                             key="val_len"))
        sampler_cls = StreamSequentialBatchSampler if getattr(self, "stream_order", False) else SequentialBatchSampler
        return self._loader(self.val_set, sampler_cls(len(self.val_set), self.cfg.batch_size, self.val_batches, rank, world))


def _abspaths(path) -> list[str]:
    paths = path if isinstance(path, (list, tuple)) else [path]
    return [os.path.abspath(os.path.expanduser(str(p))) for p in paths]
