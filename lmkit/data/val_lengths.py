"""Validation at several sequence lengths: ``data.val_seq_lens=[64, 512]``.

``val/loss`` (``ppl``, ``bpb``) stays the validation at ``data.seq_len``. Each listed length L adds
``val/len<L>/loss`` (``/ppl``, ``/bpb``): the same validation tokens cut into blocks of L (the
objective's block layout at L, not overlapping), at most ``trainer.val_batches`` batches, scored by the
same objective and collator. Comparing lengths shows how a model uses context (a causal LM's loss
falls with L while the context helps) and whether it extrapolates past its training length (set
``model.max_seq_len`` above ``data.seq_len``; RoPE/ALiBi-style positions can, learned ones cannot
exceed their table, which the config check refuses).
"""
from __future__ import annotations

from lmkit.config.checks import check_int, serves_own_records
from lmkit.errors import ConfigError

KEY = "data.val_seq_lens"


def check_val_seq_lens(value) -> list[int] | None:
    """A list of distinct lengths >= 2, or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{KEY} must be a non-empty list of sequence lengths, e.g. [64, 512], got {value!r}; "
                          f"null = validate at data.seq_len only")
    for i, length in enumerate(value):
        check_int(f"{KEY}[{i}]", length, minimum=2)
    if len(set(value)) != len(value):
        raise ConfigError(f"{KEY}={list(value)} lists a length twice")
    return [int(v) for v in value]


def check_run(data, objective_component, max_len: int | None) -> None:
    """Every length fits the model; the objective cuts packed text; the data serves plain validation blocks."""
    lengths = data.val_seq_lens
    if not lengths:
        return
    for i, length in enumerate(lengths):
        if max_len is not None and length > max_len:
            raise ConfigError(f"{KEY}[{i}]={length} is longer than the model's positions (model.max_seq_len={max_len}). "
                              f"Lower it or raise model.max_seq_len")
    if serves_own_records(objective_component):
        raise ConfigError(f"{KEY} needs an objective that cuts blocks from packed text; objective "
                          f"'{objective_component.name}' serves its own records or rows. Set {KEY}=null")
    for key, on in (("data.mixture", data.mixture is not None), ("data=litdata", data.source == "litdata")):
        if on:
            raise ConfigError(f"{KEY} cannot be combined with {key} yet (its validation has its own batches); set "
                              f"{KEY}=null")


def length_sets(val_tokens, objective, lengths: list[int], batch_size: int):
    """One BlockDataset per length over the validation tokens (non-overlapping blocks)."""
    from lmkit.data.datamodule import BlockDataset
    from lmkit.errors import DataError

    sets = []
    for length in lengths:
        block_len, _ = objective.block_layout(length)
        blocks = BlockDataset(val_tokens, block_len, block_len)
        if len(blocks) < batch_size:
            raise DataError(f"{KEY}: the validation split has {len(val_tokens)} tokens, fewer than one batch of "
                            f"{batch_size} blocks of {block_len} tokens at length {length}. Lower that length or "
                            f"data.batch_size, or use more validation text")
        sets.append(blocks)
    return sets


def metric_names(lengths: list[int]) -> list[str]:
    return [f"len{length}" for length in lengths]
