"""BART denoising noise, vectorized over the batch.

Reference: fairseq ``fairseq/data/denoising_dataset.py`` (``permute_sentences``,
``add_whole_word_mask`` with a Poisson span distribution and ``replace_length=1``,
``add_insertion_noise``, ``add_rolling_noise``); flags of the BART run in fairseq #1899.

Order of the noises, as in fairseq: sentence permutation, text infilling (its zero-length
spans become inserted masks), then token deletion (the BART paper's, not in fairseq's
dataset), then document rotation.

*Protected* tokens — every special token (BOS, EOS, CLS, SEP, padding, ...) — are never
masked, deleted or moved by permutation; words and spans never cross them, so rows that
pack several documents separated by EOS are noised document by document. Differences from
fairseq, on purpose: random replacements are drawn from ``vocab.regular_ids``; insertion
positions and rotation use the row's real length (padding excluded).

Text infilling in detail (fairseq's algorithm): with ``W`` words in a row, the budget is
``ceil(mask_ratio · W)`` words; span lengths are drawn from Poisson(λ) until they reach the
budget and the last is cut to fit it exactly. Spans of length 0 become ``<mask>`` tokens
inserted at random positions (never first or last); the others start at distinct random
words, cover that many whole words (stopping at a protected token) and collapse to one
``<mask>`` each; overlapping spans merge. ``random_ratio`` of the span masks (and
``ceil(random_ratio · inserts)`` of the inserted ones) are random tokens instead.
"""
from __future__ import annotations

import functools
import math

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, blend, check_gen, check_mask_like, check_tokens, check_unit, compact, exclusive_cumsum,
    excluded_table, lookup, random_keys, random_regular, real_lengths, running_index, smallest_k, uniform,
)
from lmkit.noise.vocab import NoiseVocab


def bart_noise(
    tokens: torch.Tensor,
    gen: torch.Generator,
    vocab: NoiseVocab,
    word_starts: torch.Tensor,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    random_ratio: float = 0.1,
    permute_sentence_ratio: float = 0.0,
    sentence_ends: torch.Tensor | None = None,
    delete_ratio: float = 0.0,
    rotate_ratio: float = 0.0,
    return_stats: bool = False,
) -> dict[str, torch.Tensor]:
    """Noise a batch for BART's denoising autoencoder.

    Args:
        tokens: int64 [B, L], right-padded with ``pad_id``; typically BOS ... EOS.
        gen: CPU ``torch.Generator``. vocab: :class:`NoiseVocab`.
        word_starts: bool [B, L], True where a token begins a word.
        mask_ratio: share of words to mask by text infilling (0 turns infilling off).
        poisson_lambda: mean span length in words (3; the released run used 3.5).
        random_ratio: share of masks that are a random token instead.
        permute_sentence_ratio: share of each row's sentences shuffled (1.0 = all).
        sentence_ends: bool [B, L], True on the last token of a sentence (e.g. on '.', '!',
            '?' tokens followed by whitespace); needed when ``permute_sentence_ratio > 0``.
            A protected token also ends a sentence.
        delete_ratio: probability that each unprotected token is deleted (after infilling).
        rotate_ratio: probability that a row is rotated to start at a random token; the
            first and last tokens stay in place when they are protected (BOS / EOS).
        return_stats: also return counts of the infilling plan (for tests and diagnostics).

    Returns:
        ``input_ids`` int64 [B, L]: the noised rows, right-padded with ``pad_id``. Infilling
        only shortens a row unless its zero-length spans insert more masks than its spans
        remove tokens; a row longer than L is cut to L (rare; it can lose its EOS).
        ``padding_mask`` bool [B, L] (True = real token of ``input_ids``).
        ``labels`` int64 [B, L]: the original tokens (padding → -100); the decoder
        reconstructs them (its inputs are ``labels`` shifted right, built by the objective).
        With ``return_stats``: ``num_words``, ``num_spans`` (zero-length ones included),
        ``num_inserts`` and ``masked_words`` (distinct words covered by spans), int64 [B].
    """
    id_range = check_tokens(tokens, vocab)
    check_gen(gen)
    word_starts = check_mask_like(word_starts, tokens, "word_starts")
    check_unit("mask_ratio", mask_ratio)
    if mask_ratio >= 1.0:
        raise ValueError(f"mask_ratio must be below 1 (share of words to mask, e.g. 0.3), got {mask_ratio}")
    if not isinstance(poisson_lambda, (int, float)) or not 0 < poisson_lambda < float("inf"):
        raise ValueError(
            f"poisson_lambda must be a positive number (mean span length in words, e.g. 3.0), got {poisson_lambda!r}"
        )
    check_unit("random_ratio", random_ratio)
    check_unit("permute_sentence_ratio", permute_sentence_ratio)
    check_unit("rotate_ratio", rotate_ratio)
    check_unit("delete_ratio", delete_ratio)
    if delete_ratio >= 1.0:
        raise ValueError(f"delete_ratio must be below 1 (it would delete every token), got {delete_ratio}")
    if permute_sentence_ratio > 0:
        if sentence_ends is None:
            raise ValueError(
                "permute_sentence_ratio > 0 needs sentence_ends: a bool tensor shaped like tokens, True on the "
                "last token of each sentence (e.g. tokens for '.', '!' or '?' followed by whitespace)"
            )
        sentence_ends = check_mask_like(sentence_ends, tokens, "sentence_ends")

    device = tokens.device
    B, L = tokens.shape
    lengths = real_lengths(tokens, vocab.pad_id, id_range=id_range)
    real = torch.arange(L, device=device)[None, :] < lengths[:, None]
    padded = bool(lengths.min() < L)
    protected = lookup(excluded_table(vocab, device), tokens)  # special tokens and padding
    # permutation and infilling move int32 ids: half the memory traffic of int64
    seq, ws = (tokens.int() if permute_sentence_ratio > 0 or mask_ratio > 0 else tokens), word_starts
    # runs of unprotected tokens (documents); permutation moves no protected token, so they
    # are the same for infilling
    free = ~protected
    prev_free = torch.zeros_like(free)
    prev_free[:, 1:] = free[:, :-1]
    run_first = free & ~prev_free
    single_run = int(run_first.sum(1).max()) <= 1

    if permute_sentence_ratio > 0:
        seq, ws = _permute_sentences(seq, ws, sentence_ends, free, prev_free, run_first, single_run,
                                     permute_sentence_ratio, gen)
    stats = {}
    if mask_ratio > 0:
        seq, lengths, stats = _text_infilling(seq, ws, protected, prev_free, real if padded else None, run_first,
                                              single_run, vocab, mask_ratio, poisson_lambda, random_ratio, gen)
    seq = seq.long()
    if delete_ratio > 0:
        seq, lengths = _delete_tokens(seq, lengths, vocab, delete_ratio, gen)
    if rotate_ratio > 0:
        seq = _rotate(seq, lengths, vocab, rotate_ratio, gen)

    out = {
        "input_ids": seq,
        "padding_mask": torch.arange(L, device=device)[None, :] < lengths[:, None],
        "labels": tokens.masked_fill(~real, IGNORE_INDEX) if padded else tokens.clone(),
    }
    if return_stats:
        zero = torch.zeros(B, dtype=torch.long, device=device)
        for key in ("num_words", "num_spans", "num_inserts", "masked_words"):
            out[key] = stats.get(key, zero)
    return out


# -- sentence permutation ---------------------------------------------------------------------
def _permute_sentences(tokens, ws, sentence_ends, free, prev_free, run_first, single_run, ratio, gen):
    """Shuffle ``ceil(ratio · sentences)`` random sentences of each row among their own slots.

    Sentences are runs of unprotected tokens ended by ``sentence_ends`` or a protected token;
    a sentence moves only within its run of unprotected tokens (its document).
    """
    device = tokens.device
    B, L = tokens.shape
    pos = torch.arange(L, dtype=torch.int32, device=device).expand(B, L)
    prev_end = torch.zeros_like(free)
    prev_end[:, 1:] = sentence_ends[:, :-1]
    sent_first = free & (~prev_free | prev_end)
    count = sent_first.cumsum(1, dtype=torch.int32)
    n_sent = count[:, -1].long()
    S = max(int(n_sent.max()), 1)
    at_first = (count * sent_first).long()  # 1 + sentence index at sentence starts, else 0 (a dump column)
    sid = count.sub_(1).clamp_(min=0).long()  # sentence of each free token

    def per_sentence(values):
        return torch.zeros((B, S + 1), dtype=torch.int32, device=device).scatter_(1, at_first, values)[:, 1:]

    start = per_sentence(pos)
    valid = torch.arange(S, device=device)[None, :] < n_sent[:, None]
    if single_run:  # sentences tile the row's one run: each ends where the next starts
        nxt = torch.cat([start[:, 1:], start[:, :1]], dim=1)
        run_end = start[:, :1] + free.sum(1, dtype=torch.int32)[:, None]
        nxt.scatter_(1, (n_sent - 1).clamp(min=0)[:, None], run_end)
        length = (nxt - start) * valid
    else:
        length = torch.zeros((B, S), dtype=torch.int32, device=device).scatter_add_(1, sid, free.int())
    # movers sorted by document, randomly within it; slot s of a document gets its s-th mover
    keys = uniform((B, S), gen, device)
    if not single_run:
        keys += per_sentence(running_index(run_first)[0])
    if ratio >= 1.0:  # every sentence moves: the slots are all of them, in order
        ordering = torch.where(valid, keys, float("inf")).argsort(dim=1)
    else:
        inf = torch.full((B, S), float("inf"), dtype=torch.float64, device=device)
        n_perm = torch.ceil(n_sent.double() * ratio).long()
        chosen = smallest_k(random_keys((B, S), gen, device, blocked=~valid), n_perm)
        movers = torch.where(chosen, keys, inf).argsort(dim=1)
        slot_keys = torch.arange(S, device=device, dtype=torch.float64).expand(B, S)
        slots = torch.where(chosen, slot_keys, inf).argsort(dim=1)
        k_ok = torch.arange(S, device=device)[None, :] < n_perm[:, None]
        ordering = torch.arange(S + 1, device=device).expand(B, S + 1).contiguous()
        ordering.scatter_(1, torch.where(k_ok, slots, S), torch.where(k_ok, movers, S))
        ordering = ordering[:, :S]  # ordering[s] = the sentence placed in slot s
    new_len = length.gather(1, ordering)
    out_start = start + exclusive_cumsum(new_len) - exclusive_cumsum(length)
    dest_start = torch.zeros((B, S), dtype=torch.int32, device=device).scatter_(1, ordering, out_start)
    dest = (dest_start - start).gather(1, sid)  # how far each token's sentence moves
    dest *= free
    dest += pos
    dest = dest.long()
    new_tokens = torch.empty_like(tokens).scatter_(1, dest, tokens)
    new_ws = torch.empty_like(ws).scatter_(1, dest, ws)
    return new_tokens, new_ws


# -- text infilling --------------------------------------------------------------------------
def _poisson_spans(budget: torch.Tensor, lam: float, gen) -> torch.Tensor:
    """Poisson span lengths, drawn until each row's budget is reached; the last one is cut
    so the lengths sum to the budget exactly. Returns int64 [B, K], -1 past each row's spans."""
    device = budget.device
    B = budget.shape[0]
    # draws come in chunks large enough for almost every row (mean + 4 sd of the count needed)
    need = float(budget.max()) / lam
    K = max(int(need + 4 * need ** 0.5) + 4, 1)
    lens = _poisson(lam, (B, K), gen, device)
    while bool((lens.sum(1) < budget).any()):
        lens = torch.cat([lens, _poisson(lam, (B, K), gen, device)], dim=1)
    cum = lens.cumsum(1)
    n_spans = torch.where(budget > 0, (cum < budget[:, None]).sum(1) + 1, torch.zeros_like(budget))
    ar = torch.arange(lens.shape[1], device=device)[None, :]
    last = ar == (n_spans - 1)[:, None]
    lens = torch.where(last, budget[:, None] - (cum - lens), lens)
    return torch.where(ar < n_spans[:, None], lens, -1)


def _poisson(lam: float, shape, gen, device) -> torch.Tensor:
    """Poisson(lam) draws by inverse CDF (float64 table up to far in the tail; much faster
    than ``torch.poisson``).

    A table over 1024 equal bins of the uniform gives each draw a first guess, never above the
    answer; a few vectorized steps up the CDF finish the rare draws whose bin holds a step
    (cheaper than a binary search per draw).
    """
    cdf, guess = _poisson_tables(float(lam), str(device))
    u = uniform(shape, gen, device)
    x = guess.index_select(0, (u * guess.numel()).long().view(-1)).view(shape)
    while True:
        up = u >= cdf.index_select(0, x.view(-1)).view(shape)
        if not bool(up.any()):
            return x
        x += up


@functools.lru_cache(maxsize=16)
def _poisson_tables(lam: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson(lam) CDF (float64, 1.0 at the end) and, for each of 1024 equal bins of [0, 1),
    the value drawn for the bin's left edge."""
    top = int(lam + 20 * lam ** 0.5 + 20)
    k = torch.arange(top + 1, dtype=torch.float64, device=device)
    cdf = torch.exp(k * math.log(lam) - lam - torch.lgamma(k + 1)).cumsum(0)
    cdf[-1] = 1.0
    edges = torch.arange(1024, dtype=torch.float64, device=device) / 1024
    return cdf, torch.searchsorted(cdf, edges, right=True)


def _distinct_draws(n: torch.Tensor, k: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k[b]`` distinct uniform values from ``range(n[b])`` per row (needs ``k <= n``), every
    subset equally likely, in random order.

    Returns ``(vals, chosen, order)``, all [B, M]: the values (int64), which of them are the
    row's picks, and each pick's 1-based place in the random order (int32; meaningless
    elsewhere). When every row needs few items (``4k <= n``) they are drawn with replacement,
    a few more than needed, and the first ``k`` distinct ones kept (sampling without
    replacement by rejection: a few ops on [B, ~k] instead of a top-k over all ``n``);
    otherwise the smallest random keys of all ``n`` items are taken.
    """
    device = n.device
    B = n.shape[0]
    kmax = max(int(k.max()), 1)
    if bool((4 * k <= n).all()):
        m = kmax + kmax * kmax // max(int(n.min()), 1) + 8  # ~ k + 2 · expected repeats + slack
        while True:
            draw = torch.arange(m, dtype=torch.int32, device=device).expand(B, m)
            vals = torch.floor(uniform((B, m), gen, device) * n[:, None]).long()
            # first draw of each value: the smallest draw index landing on it
            first_draw = torch.full((B, int(n.max()) + 1), m, dtype=torch.int32, device=device)
            first_draw.scatter_reduce_(1, vals, draw, "amin")
            first = first_draw.gather(1, vals) == draw
            order = first.cumsum(1, dtype=torch.int32)
            if bool((order[:, -1] >= k).all()):  # else draw again, with more (rare)
                return vals, first & (order <= k[:, None]), order
            m *= 2
    N = max(int(n.max()), kmax)
    blocked = torch.arange(N, device=device)[None, :] >= n[:, None]
    vals = random_keys((B, N), gen, device, blocked).topk(kmax, dim=1, largest=False).indices
    order = torch.arange(1, kmax + 1, dtype=torch.int32, device=device).expand(B, kmax)
    return vals, order <= k[:, None], order


def _run_end_words(run_first, starts, widx, n_words, w0, W, single_run):
    """One past the last word of the run of unprotected tokens holding word ``w0`` ([B, K])."""
    if single_run:  # one run per row: it ends after the row's last word
        return n_words[:, None]
    B = starts.shape[0]
    G = max(int(run_first.sum(1).max()), 1)
    seg = running_index(run_first)[0].long()  # run of each token (meaningless where not eligible)
    words_per_seg = torch.zeros((B, G), dtype=torch.long, device=seg.device).scatter_add_(1, seg, starts.long())
    seg_end_word = words_per_seg.cumsum(1)
    word_seg = torch.zeros((B, W + 1), dtype=torch.long, device=seg.device)
    word_seg.scatter_(1, blend(starts, widx, W), seg)
    return seg_end_word.gather(1, word_seg.gather(1, w0))


_KEEP, _DELETE = -1, -2  # per-word actions; a value >= 0 is the id replacing the word's first token


def _text_infilling(tokens, ws, protected, prev_free, real, run_first, single_run, vocab, mask_ratio, lam,
                    random_ratio, gen):
    """fairseq's ``add_whole_word_mask`` (Poisson spans, ``replace_length=1``) followed by
    ``add_insertion_noise`` for the zero-length spans. ``real`` is None when no row is padded."""
    device = tokens.device
    B, L = tokens.shape
    eligible = ~protected
    starts = eligible & (ws | ~prev_free)  # effective_word_starts, reusing the shifted mask
    widx, n_words = running_index(starts)  # word of each token (meaningless where not eligible)
    W = max(int(n_words.max()), 1)
    budget = torch.ceil(n_words.double() * mask_ratio).long()

    span_lens = _poisson_spans(budget, lam, gen)
    valid = span_lens >= 0
    nonzero = span_lens > 0
    n_inserts = (valid & ~nonzero).sum(1)
    n_mask = nonzero.sum(1)  # <= budget <= words
    # distinct random start words; their random order pairs them with the non-zero lengths
    w0, span_ok, order = _distinct_draws(n_words, n_mask, gen)
    K = w0.shape[1]
    nz_lens = compact(span_lens, nonzero, K, 0)[0].gather(1, (order.long() - 1).clamp_(0, K - 1))
    w_end = torch.minimum(w0 + nz_lens, _run_end_words(run_first, starts, widx, n_words, w0, W, single_run))

    # per word: kept, deleted (inside a span after its first word), or its first token replaced
    # by the span's mask / random token (the rest of the word deleted)
    has_interior = span_ok & (w_end > w0 + 1)
    edges = torch.cat([torch.where(has_interior, w0 + 1, W + 1), torch.where(has_interior, w_end, W + 1)], dim=1)
    step = has_interior.int()
    interior = torch.zeros((B, W + 2), dtype=torch.int32, device=device)
    interior.scatter_add_(1, edges, torch.cat([step, -step], dim=1))
    in_interior = interior[:, :W].cumsum(1, dtype=torch.int32) > 0
    rand_span = uniform((B, K), gen, device) < random_ratio
    repl = torch.where(rand_span, random_regular(vocab, (B, K), gen, device), vocab.mask_id).int()
    action = torch.full((B, W + 1), _KEEP, dtype=torch.int32, device=device)
    action.scatter_(1, torch.where(span_ok, w0, W), repl)
    action = action[:, :W].sub_(_DELETE).mul_(~in_interior).add_(_DELETE)  # interior words → _DELETE
    tok_action = action.gather(1, widx.long())
    hit = eligible & (tok_action != _KEEP)
    to_mask = starts & (tok_action >= 0)
    keep = ~hit | to_mask
    if real is not None:
        keep &= real
    values = tok_action.sub_(tokens).mul_(to_mask).add_(tokens)  # the replacement where to_mask, else the token
    out, new_len = _place_with_inserts(values, keep, n_inserts, vocab, random_ratio, gen)
    stats = {
        "num_words": n_words,
        "num_spans": valid.sum(1),
        "num_inserts": n_inserts,
        "masked_words": (action != _KEEP).sum(1),
    }
    return out, new_len, stats


def _place_with_inserts(values, keep, n_inserts, vocab, random_ratio, gen):
    """Compact the kept tokens of each row and insert ``n_inserts`` masks at distinct random
    positions, never first or last (fairseq's ``add_insertion_noise``): each kept token is
    scattered straight to its final slot, then the inserts into theirs.

    ``ceil(random_ratio · inserts)`` of the inserted tokens are random ones. Rows longer than
    L are cut. Returns ``(out [B, L], lengths)``.
    """
    device = values.device
    B, L = values.shape
    count = keep.cumsum(1, dtype=torch.int32)  # kept tokens up to each token
    n_kept = count[:, -1].long()
    n_ins = torch.minimum(n_inserts, (n_kept + n_inserts - 2).clamp(min=0))
    new_len = n_kept + n_ins
    # rows are laid end to end after one dump slot (index 0: masking an index by multiplying
    # with a bool sends it there, cheaper than a select)
    row_start = torch.arange(1, B * L, L, dtype=torch.int32, device=device)[:, None]
    dest = count - 1
    kmax = int(n_ins.max())
    if kmax > 0:  # n_ins distinct slots in [1, new_len − 2]; the first n_rand (random order) get random tokens
        idx, take, order = _distinct_draws((new_len - 2).clamp(min=0), n_ins, gen)
        idx = torch.where(take, idx + 1, int(new_len.max()))  # the padding sorts after every slot
        # insert j goes right before the kept token of rank idx_j − (inserts before it): find
        # that token and shift it and every token after it one slot right
        # inserts before each one = its rank in the row (taken slots are distinct; untaken ones sort
        # last and are never used): a sort, not a [B, k, k] comparison, since k can reach hundreds
        order_in_row = idx.argsort(1)
        before = torch.empty_like(order_in_row).scatter_(
            1, order_in_row, torch.arange(idx.shape[1], device=device).expand_as(order_in_row))
        at = torch.searchsorted(count, (idx - before + 1).int())
        shift = torch.zeros((B, L + 1), dtype=torch.int32, device=device)
        shift.scatter_add_(1, torch.where(take, at, L), take.int())
        dest += shift[:, :L].cumsum(1, dtype=torch.int32)
        n_rand = torch.ceil(n_ins.double() * random_ratio).long()
        ins_vals = torch.where(order <= n_rand[:, None], random_regular(vocab, idx.shape, gen, device),
                               vocab.mask_id).to(values.dtype)
    flat = torch.full((B * L + 1,), vocab.pad_id, dtype=values.dtype, device=device)
    dest_ok = keep & (dest < L)
    dest += row_start
    dest *= dest_ok
    flat.scatter_(0, dest.view(-1).long(), values.view(-1))
    if kmax > 0:
        ins_ok = take & (idx < L)
        flat.scatter_(0, ((idx + row_start) * ins_ok).view(-1), ins_vals.view(-1))
    return flat[1:].view(B, L), new_len.clamp(max=L)


# -- token deletion, rotation -----------------------------------------------------------------
def _delete_tokens(tokens, lengths, vocab, ratio, gen):
    B, L = tokens.shape
    device = tokens.device
    real = torch.arange(L, device=device)[None, :] < lengths[:, None]
    drop = real & ~vocab.special_table.to(device)[tokens] & (uniform((B, L), gen, device) < ratio)
    out, n = compact(tokens, real & ~drop, L, vocab.pad_id)
    return out, n


def _rotate(tokens, lengths, vocab, ratio, gen):
    """fairseq's rolling noise: keep a protected first/last token in place and rotate the
    rest by ``offset − 1`` with ``offset`` uniform in [1, m + 1] (m = tokens rotated)."""
    B, L = tokens.shape
    device = tokens.device
    table = vocab.special_table.to(device)
    first_fixed = table[tokens[:, 0]].long()
    last_tok = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    last_fixed = table[last_tok].long()
    a = first_fixed
    m = lengths - last_fixed - a
    do = (uniform((B,), gen, device) < ratio) & (m >= 2)
    offset = torch.floor(uniform((B,), gen, device) * (m + 1).clamp(min=1)).long()  # 0 .. m
    shift = torch.remainder(offset, m.clamp(min=1))
    pos = torch.arange(L, device=device)[None, :]
    inside = do[:, None] & (pos >= a[:, None]) & (pos < (a + m)[:, None])
    src = a[:, None] + torch.remainder(pos - a[:, None] + shift[:, None], m.clamp(min=1)[:, None])
    return torch.where(inside, tokens.gather(1, src.clamp(0, L - 1)), tokens)
