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
    IGNORE_INDEX, check_fracs, check_gen, check_mask_like, check_open_unit, check_tokens, exclusive_cumsum,
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
    eligible = lookup(~excluded_table(vocab, device), tokens)
    starts = effective_word_starts(eligible, word_starts)
    # 1-based word of each token (0 before the first word; meaningless where not eligible):
    # column w + 1 of the [B, W + 1] word tables holds word w, column 0 stays empty
    widx = starts.cumsum(1)
    n_words = widx[:, -1]
    W = max(int(n_words.max()), 1)

    # tokens per word, summed up: wcum[b, w] = tokens before word w (0-based)
    word_len = torch.zeros((B, W + 1), dtype=torch.int32, device=device)
    word_len.scatter_add_(1, widx, eligible.int())
    wcum = word_len.cumsum(1)
    n_tok = wcum[:, W]  # every eligible token is in a word
    budget = torch.ceil(n_tok.double() * mask_prob).long()
    past_end = torch.arange(W + 1, device=device)[None, :] > n_words[:, None]
    wcum.masked_fill_(past_end, 1 << 40)  # past the last word: beyond any target
    word_len = word_len[:, 1:]

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
    room = n_words[:, None] - exclusive_cumsum(lens + 1)
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
    excl = exclusive_cumsum(lens)
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
    before = exclusive_cumsum(o_tok)
    taken = o_fit & (before < budget[:, None])
    used = _shorten_last(taken, o_start, o_len, before, budget, wcum, max_span_words)

    # word columns are 1-based (as in widx); column W + 1 takes the candidates not taken
    first = torch.where(taken, o_start + 1, W + 1)
    stop = torch.where(taken, o_start + used + 1, W + 1)
    # rows whose words are too long for spans kept one word apart: add single words at random
    span_tok = wcum.gather(1, torch.where(taken, o_start + used, 0)) - wcum.gather(1, torch.where(taken, o_start, 0))
    shortfall = budget - span_tok.sum(1)
    if bool((shortfall > 0).any()):
        word_span = _paint(first, stop, torch.arange(1, K + 1, device=device).expand(B, K), W + 2)[:, 1:W + 1] - 1
        word_span = _fill_shortfall(word_span, word_len, n_words, shortfall, K, gen)
        span_code = _span_codes(uniform((B, K + W), gen, device), mask_token_frac, random_token_frac)
        word_code = torch.zeros((B, W + 2), dtype=torch.int32, device=device)
        word_code[:, 1:W + 1] = span_code.gather(1, word_span.clamp(min=0).long()) * (word_span >= 0)
    else:  # spans neither touch nor overlap: paint each span's code over its words
        span_code = _span_codes(uniform((B, K), gen, device), mask_token_frac, random_token_frac)
        word_code = _paint(first, stop, span_code, W + 2)
    code = word_code.gather(1, widx)
    code *= eligible
    input_ids, labels, flat = _apply_codes(tokens, code, gen, vocab)
    padded = id_range[0] <= vocab.pad_id <= id_range[1]
    real = tokens != vocab.pad_id if padded else torch.ones((B, L), dtype=torch.bool, device=device)
    padded = padded and not bool(real.all())
    out = {"input_ids": input_ids, "labels": labels, "padding_mask": real,
           **_boundaries(flat, B, L, real if padded else None, spare=widx)}
    if return_stats:
        out["span_words"] = torch.where(taken, o_len, -1)
        out["span_words_used"] = torch.where(taken, used, -1)
        out["budget"] = budget
    return out


def _paint(first: torch.Tensor, stop: torch.Tensor, value: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [B, width]: ``value[b, k]`` over columns ``first[b, k] <= c < stop[b, k]`` (summed
    where ranges overlap, which callers avoid), 0 elsewhere."""
    out = torch.zeros((first.shape[0], width), dtype=torch.int32, device=first.device)
    value = value.int()
    out.scatter_add_(1, first, value)
    out.scatter_add_(1, stop, -value)
    return out.cumsum(1, dtype=torch.int32)


def _fill_shortfall(word_span, word_len, n_words, shortfall, first_id: int, gen) -> torch.Tensor:
    """Give uncovered words (``word_span`` −1), in random order, span ids of their own
    (``first_id`` + a word count) until each row's ``shortfall`` tokens are covered."""
    B, W = word_span.shape
    device = word_span.device
    free_word = (torch.arange(W, device=device)[None, :] < n_words[:, None]) & (word_span < 0)
    order = torch.where(free_word, uniform((B, W), gen, device), float("inf")).argsort(dim=1)
    o_free = free_word.gather(1, order)
    f_len = word_len.gather(1, order) * o_free
    add = o_free & (exclusive_cumsum(f_len) < shortfall[:, None])
    new_id = first_id + torch.arange(W, dtype=word_span.dtype, device=device).expand(B, W)
    return word_span.scatter_(1, order, torch.where(add, new_id, word_span.gather(1, order)))


def _span_codes(u: torch.Tensor, mask_token_frac: float, random_token_frac: float) -> torch.Tensor:
    """80/10/10 per span from uniforms ``u``: 1 = [MASK], 2 = random token, 3 = unchanged."""
    return 3 - (u < mask_token_frac + random_token_frac).int() - (u < mask_token_frac).int()


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


def _apply_codes(tokens, code, gen, vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` from the per-token codes (0 = not masked, 1 = [MASK],
    2 = random token, 3 = unchanged), plus the flat positions of the masked tokens (increasing).

    Only the masked tokens (about 15%) are touched after one ``nonzero``; random ids are drawn
    in row-major order of the tokens that get one."""
    B, L = tokens.shape
    flat = code.view(-1).nonzero().squeeze(1)
    c = code.view(-1).index_select(0, flat)
    orig = tokens.view(-1).index_select(0, flat)
    new = torch.where(c == 1, vocab.mask_id, orig)
    to_random = c == 2
    new.masked_scatter_(to_random, random_regular(vocab, (int(to_random.sum()),), gen, tokens.device))
    input_ids = tokens.clone()
    input_ids.view(-1).scatter_(0, flat, new)
    labels = torch.full((B * L,), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
    return input_ids, labels.scatter_(0, flat, orig).view(B, L), flat


def _boundaries(flat: torch.Tensor, B: int, L: int, real: torch.Tensor | None,
                spare: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SBO indices from the runs of masked tokens (``flat``: their increasing flat positions):
    ``span_left`` / ``span_right`` (the tokens just outside the run) and ``span_pos``; -1 off
    runs and on runs that touch the row's edge or padding (``real``, None = no padding).

    ``spare``: a no longer needed int64 tensor of B·L entries, reused for ``span_left`` (memory
    already touched is cheaper to fill than a fresh buffer)."""
    left_out = spare.view(-1).fill_(-1) if spare is not None else \
        torch.full((B * L,), -1, dtype=torch.long, device=flat.device)
    out = {"span_left": left_out,
           **{k: torch.full((B * L,), -1, dtype=torch.long, device=flat.device) for k in ("span_right", "span_pos")}}
    if flat.numel() > 0:
        col = flat % L
        first = torch.ones_like(flat, dtype=torch.bool)
        first[1:] = (flat[1:] != flat[:-1] + 1) | (col[1:] == 0)
        last = torch.ones_like(first)
        last[:-1] = first[1:]
        span_pos = flat - torch.where(first, flat, 0).cummax(0).values
        to_end = torch.where(last, flat, B * L).flip(0).cummin(0).values.flip(0) - flat
        left, right = col - span_pos - 1, col + to_end + 1
        ok = (left >= 0) & (right < L)
        if real is not None:
            real = real.reshape(-1)
            ok &= real[(flat - span_pos - 1).clamp(min=0)] & real[(flat + to_end + 1).clamp(max=B * L - 1)]
        for key, value in (("span_left", left), ("span_right", right), ("span_pos", span_pos)):
            out[key].scatter_(0, flat, torch.where(ok, value, -1))
    return {k: v.view(B, L) for k, v in out.items()}


def expected_span_words(geometric_p: float = 0.2, max_span_words: int = 10) -> float:
    """Mean span length in words of the truncated geometric (3.797 for 0.2, 10)."""
    pmf = span_length_pmf(geometric_p, max_span_words)
    return float((pmf * torch.arange(1, max_span_words + 1, dtype=torch.float64)).sum())

