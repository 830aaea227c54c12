"""A sequence-length schedule: earlier optimizer steps on shorter (or longer) blocks than ``data.seq_len``.

BERT (Devlin et al. 2019) trained 90% of its steps at 128 tokens and the last 10% at 512.
``data.seq_len_schedule: [{until_step: N, seq_len: S}, ...]`` lists the earlier phases: steps
``[0, N1)`` at ``S1``, ``[N1, N2)`` at ``S2``, ..., and ``data.seq_len`` from the last ``until_step``
on. Steps, not fractions of ``trainer.max_steps``: the data order stays a pure function of
(seed, step), so a run extended or resumed with another ``max_steps`` switches where it did.

The batch size stays in sequences (BERT: 256 in both phases). Each phase cuts its own blocks
from the one packed token stream and takes them in its own seeded order (phase 0 in exactly
the order an unscheduled run would); stream positions (which seed the objective's noise)
go on counting across phases, so masks differ between phases. A resumed run sees the batches
of an uninterrupted one, before and after a switch: the loader's state adds where the current
phase began in the stream. Validation always uses ``data.seq_len`` (the final length), so
validation losses stay comparable over the whole run.
"""
from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache

import numpy as np

from lmkit.config.checks import check_int
from lmkit.data.sampler import StepBatchSampler
from lmkit.errors import ConfigError, DataError, did_you_mean

KEY = "data.seq_len_schedule"
PHASE_KEYS = ("until_step", "seq_len")
_FORM = "[{until_step: N, seq_len: S}, ...] (steps [0, N) at S; data.seq_len after the last until_step)"


def check_schedule(value) -> list[dict] | None:
    """``data.seq_len_schedule`` as a list of ``{"until_step", "seq_len"}`` with increasing steps, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{KEY} must be a list of phases {_FORM}, got {value!r}; null = one length throughout")
    if not value:
        raise ConfigError(f"{KEY} is empty: list the earlier phases as {_FORM}, or set it to null for one length "
                          f"throughout")
    phases, previous = [], 0
    for i, entry in enumerate(value):
        where = f"{KEY}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be {{until_step: N, seq_len: S}}, got {entry!r}")
        for key in entry:
            if key not in PHASE_KEYS:
                raise ConfigError(f"{where} has unknown key {key!r}.{did_you_mean(str(key), PHASE_KEYS)} "
                                  f"A phase is {{until_step: N, seq_len: S}}")
        for key in PHASE_KEYS:
            if key not in entry:
                raise ConfigError(f"{where} has no {key}: a phase is {{until_step: N, seq_len: S}}")
        check_int(f"{where}.until_step", entry["until_step"], minimum=1,
                  hint=" (the phase covers the optimizer steps before it)")
        check_int(f"{where}.seq_len", entry["seq_len"], minimum=2)
        if entry["until_step"] <= previous:
            raise ConfigError(f"{where}.until_step={entry['until_step']} is not after the previous phase's end "
                              f"(step {previous}): until_step must increase from phase to phase")
        previous = entry["until_step"]
        phases.append({"until_step": int(entry["until_step"]), "seq_len": int(entry["seq_len"])})
    return phases


def check_max_len(schedule: list[dict] | None, max_len: int | None) -> None:
    """Every scheduled length fits the model's positions."""
    for i, phase in enumerate(schedule or []):
        if max_len is not None and phase["seq_len"] > max_len:
            raise ConfigError(f"{KEY}[{i}].seq_len={phase['seq_len']} is longer than the model's positions "
                              f"(model.max_seq_len={max_len}). Lower it or raise model.max_seq_len.")


def check_objective(schedule: list[dict] | None, objective_component) -> None:
    """Objectives that serve whole records (classification) or pre-cut rows (sft) have no packed stream to re-cut."""
    from lmkit.config.checks import serves_own_records

    if schedule and serves_own_records(objective_component):
        raise ConfigError(f"{KEY} needs an objective that cuts blocks from packed text; objective "
                          f"'{objective_component.name}' serves its own records or rows. Set {KEY}=null.")


class SeqLenSchedule:
    """Phases ``(first step, seq_len, block_len, stride)``: the schedule's, then ``data.seq_len``'s."""

    def __init__(self, schedule: list[dict], seq_len: int, objective):
        self.starts = [0] + [p["until_step"] for p in schedule]
        self.seq_lens = [p["seq_len"] for p in schedule] + [seq_len]
        self.layouts = [_layout(objective, s, i, len(schedule)) for i, s in enumerate(self.seq_lens)]

    def phase_at(self, step: int) -> int:
        return bisect_right(self.starts, step) - 1

    def seq_len_at(self, step: int) -> int:
        """The ``data.seq_len`` of optimizer step ``step``."""
        return self.seq_lens[self.phase_at(step)]

    def fingerprint(self) -> list[list[int]]:
        """``[[first step, seq_len], ...]``: what the data order depends on (saved in checkpoints)."""
        return [[a, s] for a, s in zip(self.starts, self.seq_lens)]

    def train_set(self, tokens: np.ndarray, need: int, why: str) -> "PhasedBlocks":
        """One :class:`BlockDataset` per phase; each must hold one optimizer step's ``need`` blocks."""
        from lmkit.data.datamodule import BlockDataset

        sets = [BlockDataset(tokens, b, s) for b, s in self.layouts]
        for i, blocks in enumerate(sets):
            if len(blocks) < need:
                raise DataError(f"the corpus is too small for {KEY}: its training split has {len(tokens)} tokens, "
                                f"{len(blocks)} blocks of {blocks.block_len} tokens at seq_len {self.seq_lens[i]}, but "
                                f"one optimizer step needs {need} blocks ({why}). Use more text, or shorter lengths.")
        return PhasedBlocks(sets)

    def sampler(self, train_set: "PhasedBlocks", cfg, seed: int, rank: int, world: int, start_step):
        return PhasedStepBatchSampler(self.starts, [len(s) for s in train_set.sets], cfg.batch_size, cfg.grad_accum,
                                      seed, rank, world, cfg.batch_ramp_start, cfg.batch_ramp_steps, start_step)


def _layout(objective, seq_len: int, i: int, n_scheduled: int) -> tuple[int, int]:
    """The objective's (block length, stride) at ``seq_len``; its refusal names the schedule's entry."""
    try:
        return objective.block_layout(seq_len)
    except ConfigError as e:
        if i == n_scheduled:  # data.seq_len itself
            raise
        where = f"{KEY}[{i}].seq_len={seq_len}"
        raise ConfigError(str(e).replace(f"data.seq_len={seq_len}", where).replace("Raise data.seq_len.",
                                                                                    f"Raise {KEY}[{i}].seq_len.")
                          if f"data.seq_len={seq_len}" in str(e) else f"{where}: {e}") from None


class PhasedBlocks:
    """The blocks of every phase (a map-style dataset); a key ``(index, stream position, phase)`` reads ``index`` of
    ``phase``'s blocks. Torch-free, like this module: the config schema imports its checks."""

    def __init__(self, sets):
        self.sets = sets

    def __len__(self) -> int:
        return len(self.sets[-1])

    def __getitem__(self, key):
        index, position, phase = key
        return self.sets[phase][(index, position)]


class PhasedStepBatchSampler(StepBatchSampler):
    """:class:`StepBatchSampler` whose steps take blocks of their phase's length.

    Phase ``p`` (steps from ``starts[p]``) numbers its examples from the stream position where
    it began and takes them in the order of seeded permutations of its ``phase_items[p]``
    blocks: ``[seed, epoch]`` for phase 0 (an unscheduled run's order), ``[seed, epoch, p]``
    after. Keys are ``(block index, stream position, phase)``.
    """

    def __init__(self, starts: list[int], phase_items: list[int], micro_batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, ramp_start: int = 1, ramp_steps: int = 0,
                 start_step=lambda: 0, shuffle: bool = True):
        super().__init__(phase_items[0], micro_batch_size, grad_accum, seed, rank, world_size, ramp_start, ramp_steps,
                         start_step, shuffle)
        self.starts, self.phase_items = list(starts), list(phase_items)
        self._resumed_phase: tuple[int, int] | None = None  # (phase, stream position where it began)

    def phase_at(self, step: int) -> int:
        return bisect_right(self.starts, step) - 1

    def phase_begin(self, phase: int) -> int:
        """Stream position of phase ``phase``'s first example.

        A phase under way at a resume began where the checkpoint says; when the checkpoint had
        other phases (``resume_allow_data_change``), it begins at the resumed stream position.
        """
        if self._resumed_at is not None and self.starts[phase] < self._resumed_at[0]:
            if self._resumed_phase is not None and self._resumed_phase[0] == phase:
                return self._resumed_phase[1]
            return self._resumed_at[1]
        return self.stream_offset(self.starts[phase])

    @lru_cache(maxsize=8)
    def _phase_permutation(self, phase: int, epoch: int) -> np.ndarray:
        if phase == 0:
            return self._permutation(epoch)
        if not self.shuffle:
            return np.arange(self.phase_items[phase])
        return np.random.default_rng([self.seed, epoch, phase]).permutation(self.phase_items[phase])

    def keys_for_step(self, step: int) -> list[tuple[int, int, int]]:
        phase = self.phase_at(step)
        n, first = self.phase_items[phase], self.phase_begin(phase)
        begin, per_micro, keys = self.stream_offset(step), self.mbs * self.world_size, []
        for m in range(self.micro_batches_at(step)):  # this rank's stream positions, as in the base class
            micro_begin = begin + m * per_micro + self.rank * self.mbs
            for pos in range(micro_begin, micro_begin + self.mbs):
                epoch, i = divmod(pos - first, n)
                keys.append((int(self._phase_permutation(phase, epoch)[i]), pos, phase))
        return keys

    def state_dict(self) -> dict:
        """The base state, plus the current phase and the stream position where it began."""
        state = super().state_dict()
        phase = self.phase_at(state["data_steps"])
        state.update(phase=phase, phase_position=self.phase_begin(phase), seq_len_starts=list(self.starts))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "phase_position" in state and list(state.get("seq_len_starts", [])) == self.starts:
            self._resumed_phase = (int(state["phase"]), int(state["phase_position"]))
