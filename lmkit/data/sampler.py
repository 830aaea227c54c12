"""Deterministic, resumable batching by optimizer step.

The order of examples is a pure function of (seed, step): step ``s`` takes the next
``k(s) · micro_batch_size · world_size`` positions of an endless stream made of one
seeded permutation per pass over the data, and each rank takes its slice. Resuming only
needs the number of steps already consumed and the stream position they reached (both in
the checkpoint, as the loader's state), so a resumed run sees exactly the batches the
uninterrupted run would have seen, mid-epoch included; one resumed with another batch size
or number of ranks goes on from the same stream position. ``k(s)`` ramps the number of
micro-batches per step from ``ramp_start`` to ``grad_accum`` over ``ramp_steps`` steps
(GPT-3's batch-size ramp).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np


class StepBatchSampler:
    """Yields, per optimizer step, a list of ``(item_index, stream_position)`` keys for this rank."""

    def __init__(self, n_items: int, micro_batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, ramp_start: int = 1, ramp_steps: int = 0,
                 start_step: Callable[[], int] = lambda: 0, shuffle: bool = True):
        self.n_items, self.mbs, self.grad_accum = n_items, micro_batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.ramp_start, self.ramp_steps = max(1, min(ramp_start, grad_accum)), ramp_steps
        self.start_step, self.shuffle = start_step, shuffle
        self.steps_per_epoch = n_items // (micro_batch_size * grad_accum * world_size)
        self._restored_step: int | None = None
        self._resumed_at: tuple[int, int] | None = None  # (step, stream position) a resume continues from

    def micro_batches_at(self, step: int) -> int:
        """Number of micro-batches (per rank) in optimizer step ``step``."""
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.grad_accum
        return min(self.grad_accum, self.ramp_start + (self.grad_accum - self.ramp_start) * step // self.ramp_steps)

    def stream_offset(self, step: int) -> int:
        """Stream position where step ``step`` begins.

        After a resume, the saved position of the resumed step plus the examples of the steps
        since then: a run resumed with another batch size, number of micro-batches or of ranks
        continues the stream where it stopped (nothing skipped or seen twice). With the same
        layout this is the uninterrupted run's position.
        """
        if self._resumed_at is not None and step >= self._resumed_at[0]:
            resumed_step, position = self._resumed_at
            return position + self._layout_offset(step) - self._layout_offset(resumed_step)
        return self._layout_offset(step)

    def _layout_offset(self, step: int) -> int:
        """Stream position of step ``step`` when every step so far had this sampler's layout."""
        per_micro = self.mbs * self.world_size
        ramp = min(step, max(self.ramp_steps, 0))
        offset = sum(self.micro_batches_at(s) for s in range(ramp)) * per_micro
        return offset + (step - ramp) * self.grad_accum * per_micro

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        k = self.micro_batches_at(step)
        begin = self.stream_offset(step)
        keys = []
        for m in range(k):
            micro_begin = begin + m * self.mbs * self.world_size + self.rank * self.mbs
            for pos in range(micro_begin, micro_begin + self.mbs):
                epoch, i = divmod(pos, self.n_items)
                keys.append((int(self._permutation(epoch)[i]), pos))
        return keys

    def state_dict(self) -> dict:
        """The position in the data, for Lightning's checkpoints (the loader is then "resumable").

        ``data_steps``: the optimizer steps' worth of batches consumed (``start_step()``, the
        module's ``data_steps``), not of batches fetched (Lightning prefetches one batch ahead);
        ``stream_position``: where the next step begins in the stream of examples.
        """
        step = int(self.start_step())
        return {"data_steps": step, "stream_position": self.stream_offset(step), "seed": self.seed,
                "n_items": self.n_items, "micro_batch_size": self.mbs, "grad_accum": self.grad_accum,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """The next iteration starts at the saved step and stream position (see :meth:`stream_offset`)."""
        self._restored_step = int(state["data_steps"])
        if "stream_position" in state:
            self._resumed_at = (self._restored_step, int(state["stream_position"]))

    def __iter__(self):
        start = int(self.start_step()) if self._restored_step is None else self._restored_step
        self._restored_step = None
        end = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(start, end):
            yield self.keys_for_step(step)

    def __len__(self) -> int:
        return self.steps_per_epoch


class SequentialBatchSampler:
    """Validation batches: fixed consecutive blocks, one micro-batch per batch, this rank's share."""

    def __init__(self, n_items: int, batch_size: int, max_batches: int | None, rank: int = 0, world_size: int = 1):
        n_batches = n_items // batch_size
        if max_batches:
            n_batches = min(n_batches, max_batches)
        self.batches = [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(rank, n_batches, world_size)]

    def __iter__(self):
        for batch in self.batches:
            yield [(i, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class StreamStepBatchSampler(StepBatchSampler):
    """Training batches in stream order, for models with a recurrence memory (``stream_order``).

    The ``lanes = micro_batch_size · world_size`` rows of a micro-batch (over all ranks) are
    lanes: lane ``l = rank · micro_batch_size + row`` owns the contiguous blocks
    ``[l·P, (l+1)·P)``, ``P = n_items // lanes``, and reads them in order, one per micro-batch
    (across gradient-accumulation micro-batches and steps): row r of each micro-batch continues
    row r of the previous one on that rank. Micro-batch round ``g`` (the stream position divided
    by ``lanes``) reads block ``g mod P`` of every lane: still a pure function of the stream
    position, so a resume with the same layout is exact. No shuffling.

    At the end of a pass a lane starts over at its first block; the memory is not reset there (it
    then holds unrelated text, as at any document boundary of the packed stream). A run resumed
    with another batch size or number of ranks re-cuts the lanes at the saved stream position
    (rounded up to a whole micro-batch round): the data go on in stream order, but not exactly
    where each lane stopped, and the memory saved for the old layout is not used (its batch size
    differs) or no longer continues its rows.
    """

    def __init__(self, n_items: int, micro_batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, ramp_start: int = 1, ramp_steps: int = 0,
                 start_step: Callable[[], int] = lambda: 0):
        super().__init__(n_items, micro_batch_size, grad_accum, seed, rank, world_size, ramp_start, ramp_steps,
                         start_step, shuffle=False)
        self.lanes = micro_batch_size * world_size
        self.lane_len = n_items // self.lanes

    def keys_for_step(self, step: int) -> list[tuple[int, int]]:
        begin = self.stream_offset(step)
        first_round = -(-begin // self.lanes)  # a whole round (equal to begin // lanes with the same layout)
        keys = []
        for m in range(self.micro_batches_at(step)):
            rnd = (first_round + m) % self.lane_len
            for row in range(self.mbs):
                lane = self.rank * self.mbs + row
                keys.append((lane * self.lane_len + rnd, begin + m * self.lanes + lane))
        return keys


class StreamSequentialBatchSampler:
    """Validation batches in stream order: batch g of rank r holds block ``l·P + g`` of each of its lanes.

    Lanes as :class:`StreamStepBatchSampler` (``l = rank · batch_size + row``, ``batch_size · world_size``
    lanes), ``P = n_items // lanes`` batches per rank, at most ``ceil(max_batches / world_size)``: the
    same blocks as :class:`SequentialBatchSampler` when ``max_batches`` bounds them (one rank), read so
    that row r of each batch continues row r of the previous one.
    """

    def __init__(self, n_items: int, batch_size: int, max_batches: int | None, rank: int = 0, world_size: int = 1):
        lanes = batch_size * world_size
        per_lane = n_items // lanes
        if max_batches:
            per_lane = min(per_lane, -(-max_batches // world_size))
        self.batches = [[(rank * batch_size + row) * per_lane + g for row in range(batch_size)]
                        for g in range(per_lane)]

    def __iter__(self):
        for batch in self.batches:
            yield [(i, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)
