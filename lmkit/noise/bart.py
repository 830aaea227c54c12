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

import math

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, blend, check_gen, check_mask_like, check_tokens, check_unit, compact, effective_word_starts,
    excluded_table, lookup, random_keys, random_regular, random_subset, real_lengths, smallest_k, uniform,
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
    check_tokens(tokens, vocab)
    check_gen(gen)
    word_starts = check_mask_like(word_starts, tokens, "word_starts")
    check_unit("mask_ratio", mask_ratio)
    if mask_ratio >= 1.0:
        raise ValueError(f"mask_ratio must be below 1 (share of words to mask, e.g. 0.3), got {mask_ratio}")
    if not isinstance(poisson_lambda, (int, float)) or poisson_lambda <= 0:
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
    lengths = real_lengths(tokens, vocab.pad_id)
    real = torch.arange(L, device=device)[None, :] < lengths[:, None]
    protected = lookup(excluded_table(vocab, device), tokens)  # special tokens and padding
    seq, ws = tokens, word_starts

    if permute_sentence_ratio > 0:
        seq, ws = _permute_sentences(seq, ws, sentence_ends, protected, permute_sentence_ratio, gen)
    stats = {}
    if mask_ratio > 0:
        seq, lengths, stats = _text_infilling(seq, ws, protected, lengths, vocab, mask_ratio, poisson_lambda,
                                              random_ratio, gen)
    if delete_ratio > 0:
        seq, lengths = _delete_tokens(seq, lengths, vocab, delete_ratio, gen)
    if rotate_ratio > 0:
        seq = _rotate(seq, lengths, vocab, rotate_ratio, gen)

    out = {
        "input_ids": seq,
        "padding_mask": torch.arange(L, device=device)[None, :] < lengths[:, None],
        "labels": torch.where(real, tokens, IGNORE_INDEX),
    }
    if return_stats:
        zero = torch.zeros(B, dtype=torch.long, device=device)
        for key in ("num_words", "num_spans", "num_inserts", "masked_words"):
            out[key] = stats.get(key, zero)
    return out


# -- sentence permutation ---------------------------------------------------------------------
def _permute_sentences(tokens, ws, sentence_ends, protected, ratio, gen):
    """Shuffle ``ceil(ratio · sentences)`` random sentences of each row among their own slots.

    Sentences are runs of unprotected tokens ended by ``sentence_ends`` or a protected token;
    a sentence moves only within its run of unprotected tokens (its document).
    """
    device = tokens.device
    B, L = tokens.shape
    pos = torch.arange(L, device=device).expand(B, L)
    free = ~protected
    prev_free = torch.zeros_like(free)
    prev_free[:, 1:] = free[:, :-1]
    prev_end = torch.zeros_like(free)
    prev_end[:, 1:] = sentence_ends[:, :-1]
    sent_first = free & (~prev_free | prev_end)
    seg_first = free & ~prev_free
    sid = sent_first.cumsum(1).sub_(1).clamp_(min=0)  # sentence of each free token
    seg = seg_first.cumsum(1).sub_(1)
    n_sent = sent_first.sum(1)
    S = max(int(n_sent.max()), 1)
    at_first = blend(sent_first, sid, S)  # sentence index at sentence starts, else a dump column

    def per_sentence(values):
        return torch.zeros((B, S + 1), dtype=torch.long, device=device).scatter_(1, at_first, values)[:, :S]

    start = per_sentence(pos.contiguous())
    sent_seg = per_sentence(seg)
    length = torch.zeros((B, S), dtype=torch.long, device=device).scatter_add_(1, sid, free.long())
    valid = torch.arange(S, device=device)[None, :] < n_sent[:, None]
    n_perm = torch.ceil(n_sent.double() * ratio).long()
    inf = torch.full((B, S), float("inf"), dtype=torch.float64, device=device)
    chosen = smallest_k(random_keys((B, S), gen, device, blocked=~valid), n_perm)
    movers = torch.where(chosen, sent_seg.double() + uniform((B, S), gen, device), inf).argsort(dim=1)
    slots = torch.where(chosen, torch.arange(S, device=device, dtype=torch.float64).expand(B, S), inf).argsort(dim=1)
    k_ok = torch.arange(S, device=device)[None, :] < n_perm[:, None]
    ordering = torch.arange(S + 1, device=device).expand(B, S + 1).contiguous()
    ordering.scatter_(1, torch.where(k_ok, slots, S), torch.where(k_ok, movers, S))
    ordering = ordering[:, :S]  # ordering[s] = the sentence placed in slot s
    new_len = length.gather(1, ordering)
    out_start = start + (new_len.cumsum(1) - new_len) - (length.cumsum(1) - length)
    dest_start = torch.zeros((B, S), dtype=torch.long, device=device)
    dest_start.scatter_(1, ordering, out_start)
    moved = (dest_start - start).int().gather(1, sid)  # how far each token's sentence moves
    moved *= free
    dest = (moved + pos).long()
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
    than ``torch.poisson``)."""
    top = int(lam + 20 * lam ** 0.5 + 20)
    k = torch.arange(top + 1, dtype=torch.float64, device=device)
    cdf = torch.exp(k * math.log(lam) - lam - torch.lgamma(k + 1)).cumsum(0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, uniform(shape, gen, device), right=True)


def _text_infilling(tokens, ws, protected, lengths, vocab, mask_ratio, lam, random_ratio, gen):
    device = tokens.device
    B, L = tokens.shape
    eligible = ~protected
    starts = effective_word_starts(eligible, ws)
    widx = starts.cumsum(1).sub_(1).clamp_(min=0)  # word of each token (meaningless where not eligible)
    n_words = starts.sum(1)
    W = max(int(n_words.max()), 1)
    budget = torch.ceil(n_words.double() * mask_ratio).long()

    span_lens = _poisson_spans(budget, lam, gen)
    valid = span_lens >= 0
    nonzero = span_lens > 0
    n_inserts = (valid & ~nonzero).sum(1)
    n_mask = nonzero.sum(1)  # <= budget <= words <= L
    K = max(int(n_mask.max()), 1)
    nz_lens, _ = compact(span_lens, nonzero, K, 0)

    # distinct random start words, paired with the non-zero lengths
    start_pos = random_keys((B, L), gen, device, blocked=~starts).topk(K, dim=1, largest=False).indices
    span_ok = torch.arange(K, device=device)[None, :] < n_mask[:, None]
    w0 = widx.gather(1, start_pos)

    # a span stops at the end of its run of unprotected tokens
    prev_elig = torch.zeros_like(eligible)
    prev_elig[:, 1:] = eligible[:, :-1]
    seg_first = eligible & ~prev_elig
    G = max(int(seg_first.sum(1).max()), 1)
    seg = seg_first.cumsum(1).sub_(1).clamp_(min=0)  # run of each token (meaningless where not eligible)
    words_per_seg = torch.zeros((B, G), dtype=torch.long, device=device).scatter_add_(1, seg, starts.long())
    seg_end_word = words_per_seg.cumsum(1)  # one past the last word of each segment
    word_seg = torch.zeros((B, W + 1), dtype=torch.long, device=device)
    word_seg.scatter_(1, blend(starts, widx, W), seg)
    w_end = torch.minimum(w0 + nz_lens, seg_end_word.gather(1, word_seg.gather(1, w0)))

    # words inside a span after its first word are deleted; the first word's first token → mask
    interior = torch.zeros((B, W + 2), dtype=torch.long, device=device)
    has_interior = span_ok & (w_end > w0 + 1)
    dump = torch.full_like(w0, W + 1)
    interior.scatter_add_(1, torch.where(has_interior, w0 + 1, dump), has_interior.long())
    interior.scatter_add_(1, torch.where(has_interior, w_end, dump), -has_interior.long())
    in_interior = interior[:, :W].cumsum(1) > 0
    start_word = torch.zeros((B, W + 1), dtype=torch.bool, device=device)
    start_word.scatter_(1, torch.where(span_ok, w0, W), span_ok)
    start_word = start_word[:, :W]
    tok_interior = eligible & in_interior.gather(1, widx)
    tok_in_start = eligible & start_word.gather(1, widx)
    deleted = tok_interior | (tok_in_start & ~starts)
    to_mask = tok_in_start & starts & ~tok_interior
    rand_span = span_ok & (uniform((B, K), gen, device) < random_ratio)
    values = blend(to_mask, vocab.mask_id, tokens)
    # a span's mask becomes a random token (a start swallowed by another span is deleted anyway)
    at_start = values.gather(1, start_pos)
    values.scatter_(1, start_pos, torch.where(rand_span, random_regular(vocab, (B, K), gen, device), at_start))
    real = torch.arange(L, device=device)[None, :] < lengths[:, None]
    kept, n_kept = compact(values, real & ~deleted, L, vocab.pad_id)

    # zero-length spans: masks inserted at random positions, never first or last
    new_len = n_kept + n_inserts
    n_ins = torch.minimum(n_inserts, (new_len - 2).clamp(min=0))
    new_len = n_kept + n_ins
    Wout = max(int(new_len.max()), 1)
    ar = torch.arange(Wout, device=device)[None, :]
    n_rand = torch.ceil(n_ins.double() * random_ratio).long()
    ins = torch.zeros((B, Wout + 1), dtype=torch.bool, device=device)
    out = torch.full((B, Wout + 1), vocab.pad_id, dtype=torch.long, device=device)
    kmax = int(n_ins.max())
    if kmax > 0:  # n_ins distinct slots in [1, new_len − 2]; a random n_rand of them get random tokens
        idx = random_subset((new_len - 2).clamp(min=0), n_ins, gen) + 1  # padded with new_len − 1
        k = torch.arange(kmax, device=device)[None, :]
        take = k < n_ins[:, None]
        idx = torch.where(take, idx, Wout)  # dump column
        rank = random_keys((B, kmax), gen, device, blocked=~take).argsort(dim=1).argsort(dim=1)
        ins_vals = torch.where(rank < n_rand[:, None], random_regular(vocab, (B, kmax), gen, device), vocab.mask_id)
        ins.scatter_(1, idx, take)
        out.scatter_(1, idx, ins_vals)
    ins, out = ins[:, :Wout], out[:, :Wout]
    others = (ar < new_len[:, None]) & ~ins
    src = (others.long().cumsum(1) - 1).clamp(min=0, max=L - 1)
    out = torch.where(others, kept.gather(1, src), out)
    if Wout >= L:
        out = out[:, :L]
    else:
        out = torch.cat([out, torch.full((B, L - Wout), vocab.pad_id, dtype=torch.long, device=device)], dim=1)
    stats = {
        "num_words": n_words,
        "num_spans": valid.sum(1),
        "num_inserts": n_inserts,
        "masked_words": (start_word | in_interior).sum(1),
    }
    return out, new_len.clamp(max=L), stats


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
