"""SpanBERT span masking (with the Span Boundary Objective's indices), vectorized.

Reference: facebookresearch/SpanBERT ``pretraining/fairseq/data/masking.py``
(``PairWithSpanMaskingScheme``, ``span_masking`` with ``replacement="span"``).

Per row: budget ``ceil(mask_prob · n)`` over the ``n`` maskable tokens (not special, not
padding); span lengths in *words* ~ Geometric(p) truncated at ``max_span_words``
(mean ≈ 3.8 for p = 0.2, 10); spans cover whole words; 80/10/10 is decided once per span.

Placement, as in the reference: a span is anchored at a uniformly random maskable *token*
and starts at the first token of that token's word, then runs right over whole words. So a
word starts a span in proportion to its token count, and long (multi-token) words are masked
more often than their share of the words. Measured, mean token count of the words with a
masked token, at 1.25 tokens per word (60,000 rows of 126 tokens, words of 1 or 2 tokens):
lmkit 1.291, SpanBERT's rule (plain-Python port, tests/noise) 1.292, lmkit before (uniform
over words) 1.250; 38.9% of spans start at a 2-token word (SpanBERT 39.3%, before 25.0%).
With geometric word lengths of mean 1.25 (50,000 rows): lmkit 1.316, SpanBERT
(``tools/bench_noise.py``'s port) 1.319, before 1.250; standard errors 0.001 or less.

How it is vectorized, and where it differs from the reference's sequential rejection loop
(on purpose, documented): each row draws a generous set of candidate spans with i.i.d.
lengths and places them in candidate order, in rounds (:func:`_place_spans`; 3 or 4 at
the default 15%): an anchor is redrawn when its span would touch or overlap a span
already placed or run past the row's last word, so spans stay at least one word apart and
inside the row (the reference merges touching spans and cuts a span at the row's end). The
candidates are then taken in order until the token budget is reached, and the last one taken
is shortened to the fewest whole words that reach it. So spans never touch or merge, every
span is whole words (the reference may cut its last span mid-word), and the masked count is
the budget, or a few tokens over when the last word is several tokens long. Keeping spans
apart leaves slightly fewer long words free for later anchors (1.316 vs 1.319 above). A span
that would cross a special token is split there (special tokens are never masked). In a row
whose words leave no room for another span one word apart (short rows, or ``mask_prob``
above ~0.5), a span is shortened to the longest free stretch, and single words are added
at random until the budget is met (they may touch other spans).

Cost of the placement rounds (tools/bench_noise.py's spanbert case, batch 256, one thread,
shared 2-core CPU, 4–6 runs): 35,400–38,500 sequences/s at length 512, 0.78–0.88x the former
uniform-over-words stars-and-bars placement (41,800–47,800) and 10–11x the per-example
reference (3,500); 74,100–77,500 at length 128, 0.75–0.76x the former (97,900–101,800) and
8.4–8.8x the reference (8,800). Denser masking takes more rounds: at length 512, ``mask_prob``
0.3 / 0.5 / 0.8 take 1.7x / 2.5x / 2.9x the time of the former placement (rounds capped at 8).
"""
from __future__ import annotations

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, check_fracs, check_gen, check_mask_like, check_open_unit, check_tokens, effective_word_starts,
    excluded_table, exclusive_cumsum, lookup, random_regular, running_index, uniform,
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
        spans taken, in the order taken; -1 past the last; a span longer than every free
        stretch left in its row is shortened to the longest one),
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
    n_tok = wcum[:, W].clone()  # every eligible token is in a word
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
    # place them in order, each anchored at a random token (SpanBERT's rule), in rounds
    rank = running_index(eligible)[0].long()  # eligible tokens by rank -> their 0-based words
    tok_word = torch.zeros((B, L + 1), dtype=torch.int32, device=device)
    tok_word.scatter_(1, torch.where(eligible, rank, L), (widx - 1).int())
    placed, span_start, lens, tok = _place_spans(lens, k_row, budget, wcum, n_words, tok_word, n_tok, gen)

    # take the placed candidates in order until the token budget is met; shorten the last
    before = exclusive_cumsum(tok)
    taken = placed & (before < budget[:, None])
    ar_K = torch.arange(K, device=device)[None, :]
    if torch.equal(taken, ar_K < taken.sum(1, keepdim=True)):  # as a rule the taken are a prefix
        o_len, o_start = lens, span_start
    else:  # a candidate left out before the last one taken (crowded rows): taken first, in order
        order = torch.sort((~taken).to(torch.uint8), dim=1, stable=True).indices
        taken, o_len, o_start, tok = (x.gather(1, order) for x in (taken, lens, span_start, tok))
        before = exclusive_cumsum(tok * taken)
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


def _place_spans(lens, k_row, budget, wcum, n_words, tok_word, n_tok, gen, tries: int = 8, max_rounds: int = 8):
    """Place the candidate spans (``lens[b, k]`` words each) in candidate order, one word apart.

    SpanBERT's rule: a span starts at the word holding a uniformly random maskable token (so
    a word is picked in proportion to its token count) and runs right over whole words. An
    anchor whose span would touch or overlap a span already placed, or run past the row's last
    word, is redrawn (SpanBERT merges such spans, and cuts them at the row's end), so each
    span's first word is drawn in proportion to its tokens among the starts still free for
    its length.

    In rounds instead of one span at a time. Each round, the candidates still needed (the
    ones before them, counted at their tokens when placed and at the row's mean tokens per
    word when not, stay below the budget) draw anchors (2 in the first round, where only the
    row's end is in the way, then ``tries``) and keep their first free one. Of two kept spans
    less than a word apart, the one starting further left is placed and the other one waits
    for the next round. In a row where no candidate found a free anchor, the first one is
    placed directly, at a start drawn in proportion to its tokens from the free ones, after
    being shortened to the longest free stretch if it is longer; when no word is free, the
    row's candidates are dropped. At the default 15% the candidates needed are placed within
    4 rounds; those still unplaced after ``max_rounds`` are left out (the caller covers the
    budget with single words).

    ``wcum``: int64 [B, W + 1], tokens before each 0-based word (huge past the row's end);
    ``tok_word``: int32 [B, L + 1], the 0-based word of each row's r-th eligible token.
    Returns ``placed`` bool [B, K], ``start`` (first word) int64 [B, K], ``lens`` (after
    shortening) and ``tok`` (tokens of each placed span, 0 elsewhere) int64 [B, K].
    """
    B, K = lens.shape
    W = wcum.shape[1] - 1
    device = lens.device
    ar_K = torch.arange(K, device=device)[None, :]
    ar_W = torch.arange(W, dtype=torch.int32, device=device)[None, :]
    alive = ar_K < k_row[:, None]
    lens = lens.clone()
    placed = torch.zeros((B, K), dtype=torch.bool, device=device)
    start = torch.zeros((B, K), dtype=torch.long, device=device)
    tok = torch.zeros((B, K), dtype=torch.long, device=device)
    tok_flat, wcum_flat = tok_word.view(-1), wcum.view(-1)
    n_tok_f = n_tok.double()
    per_word = (n_tok_f / n_words.clamp(min=1))[:, None]  # the row's mean tokens per word
    cost = lens * alive * per_word  # expected tokens of each candidate; the actual once placed
    for rnd in range(max_rounds):
        active = alive & ~placed & (exclusive_cumsum(cost) < budget[:, None])
        n_act = active.sum(1)
        if rnd == 0:  # nothing placed yet: the candidates needed are a prefix
            R, rows, row_ids = B, None, torch.arange(B, device=device)
            Ka = int(n_act.max())
            if Ka == 0:
                break
            idx = torch.arange(Ka, device=device).expand(B, Ka)
        else:  # only the rows with candidates left
            rows = row_ids = n_act.nonzero().squeeze(1)
            R = rows.numel()
            if R == 0:
                break
            active, n_act = active.index_select(0, rows), n_act.index_select(0, rows)
            Ka = int(n_act.max())
            idx = torch.where(active, ar_K, K + ar_K).topk(Ka, dim=1, largest=False).indices  # in order

        def sub(x):
            return x if rows is None else x.index_select(0, rows)

        ar_a = torch.arange(Ka, device=device)[None, :]
        ok = ar_a < n_act[:, None]
        lens_r, n_words_r = sub(lens), sub(n_words)
        la = lens_r.gather(1, idx)
        # anchors: uniform maskable tokens -> their words
        T = 2 if rnd == 0 else tries
        rank = (uniform((R, Ka * T), gen, device) * sub(n_tok_f)[:, None]).long()
        first = tok_flat.index_select(0, (rank + row_ids[:, None] * tok_word.shape[1]).view(-1))
        first = first.view(R, Ka, T).long()
        stop = first + la[:, :, None]
        free = stop <= n_words_r[:, None, None]
        if rnd > 0:  # blocked: the words of the spans placed, one more word either side, past the end
            placed_r, start_r = sub(placed), sub(start)
            diff = torch.zeros((R, W + 2), dtype=torch.int32, device=device)
            dump = torch.full_like(start_r, W + 1)
            diff.scatter_add_(1, torch.where(placed_r, (start_r - 1).clamp(min=0), dump), placed_r.int())
            diff.scatter_add_(1, torch.where(placed_r, (start_r + lens_r + 1).clamp(max=W), dump), -placed_r.int())
            blocked = (diff[:, :W].cumsum(1, dtype=torch.int32) > 0) | (ar_W >= n_words_r[:, None])
            n_blocked = torch.zeros((R, W + 1), dtype=torch.int32, device=device)
            torch.cumsum(blocked, 1, dtype=torch.int32, out=n_blocked[:, 1:])  # blocked words before each
            ends = torch.cat([first, stop.clamp(max=W)], 2).view(R, -1)
            nb = n_blocked.gather(1, ends).view(R, Ka, 2 * T)
            free &= nb[:, :, :T] == nb[:, :, T:]
        s = first[:, :, T - 1]  # each candidate keeps its first free anchor
        for t in range(T - 2, -1, -1):
            s = torch.where(free[:, :, t], first[:, :, t], s)
        has = free.any(2) & ok
        # spans kept less than a word apart: the one starting further left goes. Count the kept
        # spans (each with the word after it) over each word; a span goes if only it covers its
        # first word. If two start at the same word and nothing else goes, the first goes.
        e = s + la
        cover = torch.zeros((R, W + 2), dtype=torch.int32, device=device)
        cover.scatter_add_(1, torch.where(has, s, W + 1), has.int())
        cover.scatter_add_(1, torch.where(has, (e + 1).clamp(max=W + 1), W + 1), -has.int())
        win = has & (cover.cumsum(1, dtype=torch.int32).gather(1, s) == 1)
        tie = has.any(1) & ~win.any(1)
        if bool(tie.any()):
            win |= tie[:, None] & (ar_a == has.to(torch.uint8).argmax(1, keepdim=True))
        if rnd > 0:
            stuck = ~has.any(1)
            if bool(stuck.any()):
                s, la, win = _place_directly(stuck, s, la, win, blocked, n_blocked, n_words_r, sub(wcum), gen)
                e = s + la
                full = stuck & ~win[:, 0]  # no free word left: drop the row's candidates
                alive.index_put_((rows,), sub(alive) & ~(full[:, None] & active))
        offset = row_ids[:, None] * (W + 1)
        won = wcum_flat.index_select(0, (e.clamp(max=W) + offset).view(-1)) - \
            wcum_flat.index_select(0, (s + offset).view(-1))
        r2 = row_ids[:, None].expand(R, Ka)
        placed[r2, idx] |= win
        start[r2, idx] = torch.where(win, s, start[r2, idx])
        tok[r2, idx] = torch.where(win, won.view(R, Ka), tok[r2, idx])
        lens[r2, idx] = torch.where(win, la, lens[r2, idx])
        cost = torch.where(placed, tok.double(), lens * alive * per_word)
    return placed, start, lens, tok


def _place_directly(stuck, s, la, win, blocked, n_blocked, n_words, wcum, gen):
    """In the rows ``stuck`` (no candidate found a free anchor), place the first candidate
    (column 0) at a start drawn in proportion to its tokens from the starts free for its
    length, after shortening it to the row's longest free stretch if it is longer. Returns
    ``s``, ``la`` and ``win`` with those rows' first candidates set (not placed: no word free)."""
    rows = stuck.nonzero().squeeze(1)
    S, W = rows.numel(), blocked.shape[1]
    device = s.device
    ar_W = torch.arange(W, dtype=torch.int32, device=device)[None, :]
    blocked, n_blocked, n_words, wcum = (x.index_select(0, rows) for x in (blocked, n_blocked, n_words, wcum))
    # longest free stretch: each word minus the last blocked word at or before it
    seen = n_blocked[:, 1:]  # blocked words up to each
    where_blocked = torch.full((S, W + 1), -1, dtype=torch.int32, device=device)
    where_blocked.scatter_(1, torch.where(blocked, seen - 1, W).long(), ar_W.expand(S, W))
    last_blocked = torch.where(seen > 0, where_blocked.gather(1, (seen - 1).clamp(min=0).long()), -1)
    longest = (ar_W - last_blocked).amax(1).long()
    length = torch.minimum(la.index_select(0, rows)[:, 0], longest)
    # the free starts for that length, weighted by their tokens
    stop = ar_W.long() + length[:, None]
    fits = (n_blocked.gather(1, stop.clamp(max=W)) == n_blocked[:, :W]) & (stop <= n_words[:, None])
    cum = ((wcum[:, 1:] - wcum[:, :-1]) * fits).cumsum(1)
    target = (uniform((S,), gen, device) * cum[:, -1].double()).long()
    at = torch.searchsorted(cum, target[:, None], right=True).squeeze(1).clamp(max=W - 1)
    room = longest > 0
    s, la, win = s.clone(), la.clone(), win.clone()
    s[rows, 0] = torch.where(room, at, s[rows, 0])
    la[rows, 0] = torch.where(room, length, la[rows, 0])
    win[rows, 0] = room
    return s, la, win


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

