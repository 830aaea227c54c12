"""Argument checks and vectorized building blocks shared by the noise functions."""
from __future__ import annotations

import torch

from lmkit.noise.vocab import NoiseVocab

IGNORE_INDEX = -100


# -- argument checks ---------------------------------------------------------------------
def check_tokens(tokens, vocab: NoiseVocab, name: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of token ids shaped [batch, length], got {type(tokens).__name__}"
        )
    if tokens.dtype != torch.long:
        raise ValueError(f"{name} must be int64 (torch.long), got {tokens.dtype}; convert with {name}.long()")
    if tokens.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [batch, length], got shape {tuple(tokens.shape)}; "
            f"use {name}.unsqueeze(0) for a single sequence"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tokens.shape)}); pass at least one non-empty row")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab.vocab_size:
        raise ValueError(
            f"{name} holds ids outside the vocabulary [0, {vocab.vocab_size}) (min {lo}, max {hi}); "
            "was the NoiseVocab built from the tokenizer that produced them?"
        )


def check_gen(gen) -> None:
    if not isinstance(gen, torch.Generator):
        raise ValueError(
            f"gen must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got {type(gen).__name__}"
        )


def check_mask_like(mask, tokens: torch.Tensor, name: str) -> torch.Tensor:
    if mask is None:
        raise ValueError(f"{name} is required here: pass a bool tensor shaped like tokens {tuple(tokens.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor shaped like tokens {tuple(tokens.shape)}, got {shape}")
    return mask.to(device=tokens.device, dtype=torch.bool)


def check_open_unit(name: str, value: float, hint: str = "") -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}{hint}")


def check_unit(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1 (inclusive), got {value!r}")


def check_fracs(mask_token_frac: float, random_token_frac: float) -> None:
    check_unit("mask_token_frac", mask_token_frac)
    check_unit("random_token_frac", random_token_frac)
    if mask_token_frac + random_token_frac > 1.0 + 1e-12:
        raise ValueError(
            f"mask_token_frac + random_token_frac = {mask_token_frac + random_token_frac} exceeds 1; the rest "
            "(1 - both) is the share of selected tokens left unchanged, e.g. 0.8 / 0.1 leaves 0.1"
        )


# -- random draws --------------------------------------------------------------------------
def uniform(shape, gen: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) in float64 (ties between random sort keys are then practically impossible)."""
    return torch.rand(shape, generator=gen, dtype=torch.float64, device=device)


def random_regular(vocab: NoiseVocab, shape, gen: torch.Generator, device) -> torch.Tensor:
    """Ids drawn uniformly from ``vocab.regular_ids``."""
    regular = vocab.regular_ids.to(device)
    return regular[torch.randint(regular.numel(), shape, generator=gen, device=device)]


def smallest_k(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k[b]`` entries with the smallest keys in each row.

    Entries that must never be chosen carry ``inf`` keys; ``k`` must not exceed the count of
    finite keys in its row.
    """
    B, L = keys.shape
    out = torch.zeros((B, L), dtype=torch.bool, device=keys.device)
    if B == 0 or L == 0:
        return out
    kmin, kmax = int(k.min()), int(k.max())
    if kmax <= 0:
        return out
    # topk is several times faster than a full sort on CPU; take the smaller side
    if kmax <= L - kmin:
        idx = keys.topk(kmax, dim=1, largest=False, sorted=kmin != kmax).indices
        take = torch.arange(kmax, device=keys.device)[None, :] < k[:, None]
        return out.scatter_(1, idx, take)
    m = L - k  # entries left out: the largest keys (inf keys first)
    mmin, mmax = int(m.min()), int(m.max())
    out.fill_(True)
    if mmax <= 0:
        return out
    idx = keys.topk(mmax, dim=1, largest=True, sorted=mmin != mmax).indices
    drop = torch.arange(mmax, device=keys.device)[None, :] < m[:, None]
    return out.scatter_(1, idx, ~drop)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Python's ``round`` (ties to even) on a float64 tensor, as int64."""
    return torch.round(x.double()).long()


# -- sequence structure --------------------------------------------------------------------
def real_lengths(tokens: torch.Tensor, pad_id: int, name: str = "tokens") -> torch.Tensor:
    """Number of real tokens per row; padding must be trailing (right padding)."""
    real = tokens != pad_id
    lengths = real.sum(1)
    prefix = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    if not torch.equal(real, prefix):
        raise ValueError(
            f"{name} has <pad> (id {pad_id}) before real tokens; pad rows on the right only "
            "(all real tokens first, then padding)"
        )
    return lengths


def effective_word_starts(eligible: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """Word starts among ``eligible`` tokens.

    A word is a word-start token plus the eligible non-start tokens after it; an eligible token
    right after an ineligible one (a special token) starts a word even if not marked, so a
    word never spans a special token.
    """
    prev = torch.zeros_like(eligible)
    prev[:, 1:] = eligible[:, :-1]
    return eligible & (word_starts | ~prev)


def word_index(eligible: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Index (0-based, per row) of the word each eligible token belongs to; -1 elsewhere."""
    idx = starts.long().cumsum(1) - 1
    return torch.where(eligible, idx, -1)


def compact(values: torch.Tensor, keep: torch.Tensor, width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept entries of each row to the front, in order; pad with ``fill`` to ``width``.

    Returns ``(out [B, width], counts [B])``. Kept entries past ``width`` are cut.
    """
    B, L = values.shape
    dest = keep.long().cumsum(1) - 1
    ok = keep & (dest < width)
    out = torch.full((B, width + 1), fill, dtype=values.dtype, device=values.device)
    dest = torch.where(ok, dest, width)  # dump column
    out.scatter_(1, dest, torch.where(ok, values, fill))
    return out[:, :width], keep.sum(1)
