"""SpanBERT span masking (with the Span Boundary Objective's indices), vectorized.

Reference: facebookresearch/SpanBERT ``pretraining/fairseq/data/masking.py``
(``PairWithSpanMaskingScheme``, ``span_masking`` with ``replacement="span"``).

Per row: budget ``ceil(mask_prob · n)`` over the ``n`` maskable tokens (not special, not
padding); span lengths in *words* ~ Geometric(p) truncated at ``max_span_words``
(mean ≈ 3.8 for p = 0.2, 10); spans cover whole words; 80/10/10 is decided once per span.

How it is vectorized, and where it differs from the reference's sequential rejection loop
(on purpose, documented): each row draws a generous set of candidate spans with i.i.d.
lengths and places them uniformly at random without overlap, at least one word apart
(stars and bars over the row's words); the candidates are then taken in random order until
the token budget is reached, and the last one taken is shortened to the fewest whole words
that reach it. So spans never touch or merge (the reference lets them merge), every span
is whole words (the reference may cut its last span mid-word), and the masked count is the
budget, or a few tokens over when the last word is several tokens long. A span that would
cross a special token is split there (special tokens are never masked). In a short row whose
long words leave no room for spans one word apart, single words are added at random until
the budget is met (they may touch other spans).
"""
from __future__ import annotations

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, blend, check_fracs, check_gen, check_mask_like, check_open_unit, check_tokens,
    effective_word_starts, excluded_table, lookup, random_regular, random_subset, uniform,
)
from lmkit.noise.vocab import NoiseVocab


def span_length_pmf(geometric_p: float = 0.2, max_span_words: int = 10) -> torch.Tensor:
    """Probabilities of span lengths 1..max_span_words (float64 [max_span_words])."""
    k = torch.arange(1, max_span_words + 1, dtype=torch.float64)
    w = geometric_p * (1 - geometric_p) ** (k - 1)
    return w / w.sum()


def spanbert_mask(
    tokens: torch.Tensor,
    gen: torch.Generator,
    vocab: NoiseVocab,
    word_starts: torch.Tensor,
    mask_prob: float = 0.15,
    geometric_p: float = 0.2,
    max_span_words: int = 10,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
    return_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """Mask whole-word spans of geometric length for SpanBERT's MLM + SBO.

    Args:
        tokens: int64 [B, L]. gen: CPU ``torch.Generator``. vocab: :class:`NoiseVocab`.
        word_starts: bool [B, L], True where a token begins a word.
        return_stats: also return the sampled span plan (for tests and diagnostics).

    Returns:
        ``input_ids`` int64 [B, L]; ``labels`` int64 [B, L] (original id on masked tokens,
        -100 elsewhere); ``padding_mask`` bool [B, L] (True = real token);
        ``span_left`` / ``span_right`` int64 [B, L]: index of the token just before / after
        the masked span (s−1 and e+1), ``span_pos`` int64 [B, L]: the token's 0-based
        position in its span. All three are -1 on unmasked tokens, and also on masked tokens
        whose span has no boundary token (it touches the row's edge or padding); such tokens
        still count for MLM but not for SBO, as in SpanBERT.
        With ``return_stats``: ``span_words`` int64 [B, K] (sampled lengths, in words, of the
        spans taken, in the order taken; -1 past the last; in rows too short for all the
        candidates, the last candidate placed is shortened to the room left),
        ``span_words_used`` (after the last span taken is cut to the budget) and ``budget``
        int64 [B].
    """
    id_range = check_tokens(tokens, vocab)
    check_gen(gen)
    word_starts = check_mask_like(word_starts, tokens, "word_starts")
    check_open_unit("mask_prob", mask_prob, " (the share of tokens to mask, e.g. 0.15)")
    check_open_unit("geometric_p", geometric_p, " (the geometric span-length parameter, e.g. 0.2)")
    if not isinstance(max_span_words, int) or max_span_words < 1:
        raise ValueError(f"max_span_words must be a positive int (e.g. 10), got {max_span_words!r}")
    check_fracs(mask_token_frac, random_token_frac)

    device = tokens.device
    B, L = tokens.shape
    eligible = ~lookup(excluded_table(vocab, device), tokens)
    starts = effective_word_starts(eligible, word_starts)
    widx = starts.cumsum(1).sub_(1).clamp_(min=0)  # word of each token (meaningless where not eligible)
    n_words = starts.sum(1)
    n_tok = eligible.sum(1)
    budget = torch.ceil(n_tok.double() * mask_prob).long()
    W = max(int(n_words.max()), 1)

    # tokens per word and their exclusive prefix sums (wcum[b, w] = tokens before word w)
    word_len = torch.zeros((B, W + 1), dtype=torch.long, device=device)
    word_len.scatter_add_(1, widx, eligible.long())
    word_len[:, W] = 0
    wcum = torch.zeros((B, W + 1), dtype=torch.long, device=device)
    wcum[:, 1:] = word_len.cumsum(1)[:, :W]
    past_end = torch.arange(W + 1, device=device)[None, :] > n_words[:, None]
    wcum = torch.where(past_end, 1 << 40, wcum)  # past the last word: beyond any target

    # candidate spans: lengths i.i.d. from the truncated geometric
    pmf = span_length_pmf(geometric_p, max_span_words)
    mean = float((pmf * torch.arange(1, max_span_words + 1, dtype=torch.float64)).sum())
    k_row = torch.ceil(2.0 * budget.double() / mean).long() + 4
    k_row = torch.where(budget > 0, k_row, torch.zeros_like(k_row))
    K = max(int(k_row.max()), 1)
    cdf = pmf.cumsum(0).to(device)
    cdf[-1] = 1.0
    lens = torch.searchsorted(cdf, uniform((B, K), gen, device), right=True) + 1
    lens = lens.clamp(max=max_span_words)
    # keep the candidates that fit in the row with one free word between neighbours; the first
    # one that does not fit is shortened to the room left (this only happens in short rows)
    ar_K = torch.arange(K, device=device)[None, :]
    room = n_words[:, None] - ((lens + 1).cumsum(1) - (lens + 1))
    fit = (lens <= room) & (ar_K < k_row[:, None])
    fit = fit.long().cumprod(1).bool()  # a prefix
    n_fit = fit.sum(1)
    squeeze = (ar_K == n_fit[:, None]) & (ar_K < k_row[:, None]) & (room >= 1)
    lens = torch.where(squeeze, room, lens)
    fit = fit | squeeze
    n_cand = fit.sum(1)
    lens = torch.where(fit, lens, 0)
    free = n_words - (lens.sum(1) + (n_cand - 1).clamp(min=0))

    # stars and bars: choose n_cand of the (free + n_cand) slots; gaps = unchosen slots
    chosen = random_subset(free + n_cand, n_cand, gen)  # sorted slot of each candidate
    slots = torch.zeros((B, K), dtype=torch.long, device=device)
    slots[:, : chosen.shape[1]] = chosen
    excl = lens.cumsum(1) - lens
    span_start = torch.where(fit, slots + excl, torch.zeros_like(slots))  # first word of each candidate

    # take candidates in random order until the token budget is met; shorten the last
    keysK = torch.where(fit, uniform((B, K), gen, device), float("inf"))
    order = keysK.argsort(dim=1)
    o_len = lens.gather(1, order)
    o_start = span_start.gather(1, order)
    o_fit = fit.gather(1, order)
    o_end = (o_start + o_len).clamp(max=W)
    o_tok = wcum.gather(1, o_end) - wcum.gather(1, o_start)
    o_tok = torch.where(o_fit, o_tok, torch.zeros_like(o_tok))
    before = o_tok.cumsum(1) - o_tok
    taken = o_fit & (before < budget[:, None])
    used = _shorten_last(taken, o_start, o_len, before, budget, wcum, max_span_words)

    # words covered, with the (taken-order) index of their span
    cover = torch.zeros((B, W + 1), dtype=torch.long, device=device)
    span_tag = torch.arange(1, K + 1, device=device).expand(B, K)
    cover.scatter_add_(1, torch.where(taken, o_start, W), torch.where(taken, span_tag, 0))
    cover.scatter_add_(1, torch.where(taken, o_start + used, W).clamp(max=W),
                       torch.where(taken, -span_tag, 0))
    word_span = cover.cumsum(1)[:, :W] - 1  # -1 where not covered
    n_spans = K
    # rows whose words are too long for spans kept one word apart: add single words at random
    shortfall = budget - (word_len[:, :W] * (word_span >= 0)).sum(1)
    if bool((shortfall > 0).any()):
        free_word = (torch.arange(W, device=device)[None, :] < n_words[:, None]) & (word_span < 0)
        order = torch.where(free_word, uniform((B, W), gen, device), float("inf")).argsort(dim=1)
        o_free = free_word.gather(1, order)
        f_len = word_len.gather(1, order) * o_free
        add = o_free & ((f_len.cumsum(1) - f_len) < shortfall[:, None])
        new_id = K + torch.arange(W, device=device).expand(B, W)
        word_span.scatter_(1, order, torch.where(add, new_id, word_span.gather(1, order)))
        n_spans = K + W
    # 80/10/10 once per span: code 0 = not masked, 1 = [MASK], 2 = random token, 3 = unchanged
    u = uniform((B, n_spans), gen, device)
    span_code = 3 - (u < mask_token_frac + random_token_frac).int() - (u < mask_token_frac).int()
    word_code = torch.zeros((B, W + 1), dtype=torch.int32, device=device)
    covered = word_span >= 0
    word_code[:, :W] = span_code.gather(1, word_span.clamp(min=0)) * covered
    code = word_code.gather(1, widx) * eligible
    masked = code > 0
    input_ids = blend(code == 1, vocab.mask_id, tokens)
    to_random = code == 2
    input_ids.masked_scatter_(to_random, random_regular(vocab, (int(to_random.sum()),), gen, device))
    labels = blend(masked, tokens, IGNORE_INDEX)
    real = tokens != vocab.pad_id
    padded = id_range[0] <= vocab.pad_id <= id_range[1] and not bool(real.all())
    out = {"input_ids": input_ids, "labels": labels, "padding_mask": real,
           **_boundaries(masked, real if padded else None)}
    if return_stats:
        out["span_words"] = torch.where(taken, o_len, -1)
        out["span_words_used"] = torch.where(taken, used, -1)
        out["budget"] = budget
    return out


def _shorten_last(taken, o_start, o_len, before, budget, wcum, max_span_words) -> torch.Tensor:
    """Words used by each taken span: all of them, except that the last span taken in a row is
    cut to the fewest whole words that reach the budget."""
    device = o_len.device
    n_taken = taken.sum(1, keepdim=True)
    last = (n_taken - 1).clamp(min=0)
    start = o_start.gather(1, last)
    need = budget[:, None] - before.gather(1, last)
    ar = torch.arange(max_span_words + 1, device=device)[None, :]
    reach = wcum.gather(1, (start + ar).clamp(max=wcum.shape[1] - 1)) - wcum.gather(1, start)
    fewest = (reach < need).sum(1, keepdim=True).clamp(min=1)  # words until `need` tokens
    used = torch.where(taken, o_len, 0)
    cut = torch.minimum(used.gather(1, last), fewest)
    return used.scatter_(1, last, torch.where(n_taken > 0, cut, 0))


def _boundaries(masked: torch.Tensor, real: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """SBO indices from the runs of masked tokens: ``span_left`` / ``span_right`` (the tokens
    just outside the run) and ``span_pos``; -1 off runs and on runs that touch the row's edge
    or padding (``real``, None = no padding).

    Works on the flat list of masked positions (about 15% of the tokens), so the only full-size
    work is one ``nonzero`` and filling the three outputs."""
    B, L = masked.shape
    out = {k: torch.full((B * L,), -1, dtype=torch.long, device=masked.device)
           for k in ("span_left", "span_right", "span_pos")}
    flat = masked.view(-1).nonzero().squeeze(1)  # increasing
    if flat.numel() > 0:
        pos = flat % L
        first = torch.ones_like(flat, dtype=torch.bool)
        first[1:] = (flat[1:] != flat[:-1] + 1) | (pos[1:] == 0)
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        run_start = torch.where(first, flat, 0).cummax(0).values
        run_end = torch.where(last, flat, B * L).flip(0).cummin(0).values.flip(0)
        left, right = run_start % L - 1, run_end % L + 1
        ok = (left >= 0) & (right < L)
        if real is not None:
            real = real.reshape(-1)
            ok &= real[(run_start - 1).clamp(min=0)] & real[(run_end + 1).clamp(max=B * L - 1)]
        at = flat[ok]
        out["span_left"][at] = left[ok]
        out["span_right"][at] = right[ok]
        out["span_pos"][at] = (flat - run_start)[ok]
    return {k: v.view(B, L) for k, v in out.items()}


def expected_span_words(geometric_p: float = 0.2, max_span_words: int = 10) -> float:
    """Mean span length in words of the truncated geometric (3.797 for 0.2, 10)."""
    pmf = span_length_pmf(geometric_p, max_span_words)
    return float((pmf * torch.arange(1, max_span_words + 1, dtype=torch.float64)).sum())

