"""Argument checks and vectorized building blocks shared by the noise functions."""
from __future__ import annotations

import torch

from lmkit.noise.vocab import NoiseVocab

IGNORE_INDEX = -100


# -- argument checks ---------------------------------------------------------------------
def check_tokens(tokens, vocab: NoiseVocab, name: str = "tokens") -> tuple[int, int]:
    """Validate a token block; returns its smallest and largest id."""
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
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= vocab.vocab_size:
        raise ValueError(
            f"{name} holds ids outside the vocabulary [0, {vocab.vocab_size}) (min {lo}, max {hi}); "
            "was the NoiseVocab built from the tokenizer that produced them?"
        )
    return lo, hi


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


def check_open_unit(name: str, value: float, hint: str = "", error: type[Exception] = ValueError) -> None:
    """``value`` must be a number in (0, 1); raises ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise error(f"{name} must be strictly between 0 and 1, got {value!r}{hint}")


def check_unit(name: str, value: float, below_one: bool = False, error: type[Exception] = ValueError) -> None:
    """``value`` must be a number in [0, 1] (or [0, 1) with ``below_one``); raises ``error`` naming ``name``."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not (0.0 <= float(value) and (float(value) < 1.0 if below_one else float(value) <= 1.0)):
        raise error(f"{name} must be in {'[0, 1)' if below_one else '[0, 1]'}, got {value!r}")


def check_fracs(mask_token_frac: float, random_token_frac: float, prefix: str = "",
                error: type[Exception] = ValueError) -> None:
    """The 80/10/10 shares: each in [0, 1], together at most 1 (names prefixed with ``prefix``)."""
    check_unit(f"{prefix}mask_token_frac", mask_token_frac, error=error)
    check_unit(f"{prefix}random_token_frac", random_token_frac, error=error)
    if mask_token_frac + random_token_frac > 1.0 + 1e-12:
        raise error(
            f"{prefix}mask_token_frac + {prefix}random_token_frac = {mask_token_frac + random_token_frac} exceeds 1; "
            "the rest (1 - both) is the share of selected tokens left unchanged, e.g. BERT's 0.8 / 0.1 leaves 0.1"
        )


# -- random draws --------------------------------------------------------------------------
def uniform(shape, gen: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) in float64 (ties between random sort keys are then practically impossible)."""
    return torch.rand(shape, generator=gen, dtype=torch.float64, device=device)


KEY_BLOCKED = 1 << 30  # added to the keys of entries that must never be chosen


def random_keys(shape, gen: torch.Generator, device, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """Random int32 sort keys, uniform in [0, 2**30); ``blocked`` entries get ``KEY_BLOCKED``
    added so they sort after every other key.

    Integer keys are cheaper to draw and to select from than float64 ones. Two keys of a row
    tie with probability ~L^2 / 2^31, and a tie only matters when it straddles the selection
    boundary, so the bias is far below anything measurable.
    """
    keys = torch.empty(shape, dtype=torch.int32, device=device).random_(generator=gen) >> 1
    if blocked is not None:
        keys += blocked.int() << 30
    return keys


def blend(cond: torch.Tensor, a, b) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for int32-range integer values (ids), as int64.

    On CPU ``torch.where`` branches per element: when ``cond`` is a random mask it is several
    times slower than the arithmetic ``b + (a − b) · cond``, done here in int32 (int64
    multiplication is not vectorized). For predictable masks (prefixes) prefer ``torch.where``.
    """
    out = a.to(torch.int32, copy=True) if isinstance(a, torch.Tensor) else \
        torch.full(cond.shape, a, dtype=torch.int32, device=cond.device)
    b = b.int() if isinstance(b, torch.Tensor) else b
    out -= b  # in place: fewer fresh buffers (first-touch page faults cost as much as the math)
    out *= cond
    out += b
    return out.long()


def excluded_table(vocab: NoiseVocab, device) -> torch.Tensor:
    """Bool [vocab_size]: True for special tokens and padding (never noised)."""
    table = vocab.special_table.to(device).clone()
    table[vocab.pad_id] = True
    return table


def lookup(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``table[tokens]`` through ``index_select`` (a faster kernel than advanced indexing)."""
    return table.index_select(0, tokens.reshape(-1)).view(tokens.shape)


def random_regular(vocab: NoiseVocab, shape, gen: torch.Generator, device) -> torch.Tensor:
    """Ids drawn uniformly from ``vocab.regular_ids``."""
    regular = vocab.regular_ids.to(device)
    return lookup(regular, torch.randint(regular.numel(), shape, generator=gen, device=device))


def smallest_k(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``k[b]`` entries with the smallest keys in each row.

    Entries that must never be chosen carry ``inf`` keys (float keys) or ``KEY_BLOCKED`` added
    (:func:`random_keys`); ``k`` must not exceed the count of choosable entries in its row.
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


def random_subset(n: torch.Tensor, k: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A uniform random ``k[b]``-subset of ``range(n[b])`` per row, sorted: int64 [B, max(k)],
    padded with ``n[b]`` past the row's ``k[b]`` entries. Needs ``k <= n``.

    Small subsets (``k² <= 4n``: about two collisions per row or fewer) are drawn with
    replacement, and the repeats are redrawn until all entries are distinct (a few cheap
    rounds on [B, k]); larger ones take the smallest random keys of all ``n`` items. Both give
    every subset the same probability: each step treats all items alike.
    """
    device = n.device
    B = n.shape[0]
    kmax = int(k.max())
    if kmax <= 0:
        return torch.empty((B, 0), dtype=torch.long, device=device)
    ar = torch.arange(kmax, device=device)[None, :]
    pad = ar >= k[:, None]
    if kmax * kmax <= 4 * int(n.min()):
        def draw():
            return torch.floor(uniform((B, kmax), gen, device) * n[:, None]).long()

        vals = torch.where(pad, n[:, None] + ar, draw())  # padding: distinct values above range
        while True:
            vals = vals.sort(dim=1).values
            repeat = vals[:, 1:] == vals[:, :-1]
            if not bool(repeat.any()):
                return vals.clamp_(max=n[:, None])
            vals[:, 1:] = torch.where(repeat, draw()[:, 1:], vals[:, 1:])
    N = int(n.max())
    blocked = torch.arange(N, device=device)[None, :] >= n[:, None] if int(n.min()) < N else None
    keys = random_keys((B, N), gen, device, blocked)
    idx = keys.topk(kmax, dim=1, largest=False, sorted=int(k.min()) != kmax).indices
    if bool(pad.any()):
        idx = torch.where(pad, n[:, None], idx)
    return idx.sort(dim=1).values


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Python's ``round`` (ties to even) on a float64 tensor, as int64."""
    return torch.round(x.double()).long()


# -- sequence structure --------------------------------------------------------------------
def real_lengths(tokens: torch.Tensor, pad_id: int, name: str = "tokens", id_range=None) -> torch.Tensor:
    """Number of real tokens per row; padding must be trailing (right padding).

    ``id_range`` (the ``(min, max)`` from :func:`check_tokens`) skips the scan when ``pad_id``
    lies outside it."""
    full = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    if id_range is not None and not id_range[0] <= pad_id <= id_range[1]:
        return full
    real = tokens != pad_id
    if bool(real.all()):
        return full
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


def running_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running count of ``mask`` along each row minus one, clamped at 0, as int32 (``.long()``
    makes it a gather / scatter index), and the row totals (int64).

    int32 throughout: ``cumsum`` of a bool tensor straight to int64 is ~10x slower on CPU, and
    int64 element-wise ops on [B, L] cost several times their int32 versions.
    """
    count = mask.cumsum(1, dtype=torch.int32)
    total = count[:, -1].long()
    return count.sub_(1).clamp_(min=0), total


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the entries before each one along each row (0 first), in ``x``'s dtype."""
    return x.cumsum(1, dtype=x.dtype) - x


def word_index(eligible: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Index (0-based, per row) of the word each eligible token belongs to; -1 elsewhere."""
    return torch.where(eligible, running_index(starts)[0].long(), -1)


def compact(values: torch.Tensor, keep: torch.Tensor, width: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept entries of each row to the front, in order; pad with ``fill`` to ``width``.

    Returns ``(out [B, width], counts [B])``. Kept entries past ``width`` are cut.
    """
    B, L = values.shape
    dest = keep.cumsum(1, dtype=torch.int32).sub_(1)
    ok = keep & (dest < width) if width < L else keep
    dest = blend(ok, dest, width)  # the rest goes to a dump column
    out = torch.full((B, width + 1), fill, dtype=values.dtype, device=values.device)
    out.scatter_(1, dest, values)
    return out[:, :width], keep.sum(1)
