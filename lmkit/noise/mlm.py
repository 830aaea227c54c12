"""Masked language modelling noise (BERT, RoBERTa, Hugging Face), vectorized over the batch.

References: google-research/bert ``create_pretraining_data.py`` (exact count, whole-word
greedy fill), fairseq ``mask_tokens_dataset.py`` (RoBERTa: ``int(p·n + U[0,1))``, over words
when masking whole words), transformers ``DataCollatorForLanguageModeling`` (Bernoulli).

Differences from the references, on purpose: the count is taken over *candidate* tokens
(not special, not padding) rather than over the whole row including [CLS]/[SEP]; random
replacements are drawn from ``vocab.regular_ids`` (never a special token).
"""
from __future__ import annotations

import torch

from lmkit.noise._common import (
    IGNORE_INDEX, blend, check_fracs, check_gen, check_mask_like, check_open_unit, check_tokens,
    effective_word_starts, excluded_table, lookup, random_keys, random_regular, round_half_even, smallest_k,
    uniform, word_index,
)
from lmkit.noise.vocab import NoiseVocab

MLM_MODES = ("exact", "bernoulli", "roberta")


def mlm_mask(
    tokens: torch.Tensor,
    gen: torch.Generator,
    vocab: NoiseVocab,
    mask_prob: float = 0.15,
    mode: str = "exact",
    max_predictions: int | None = None,
    whole_word: bool = False,
    word_starts: torch.Tensor | None = None,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Select tokens to predict and corrupt them 80/10/10.

    Candidates are the tokens that are neither special (``vocab.special_table``) nor padding;
    with ``n`` candidates in a row, the number selected is

    * ``"exact"`` (BERT): ``min(max_predictions, max(1, round(mask_prob · n)))``;
    * ``"roberta"`` (fairseq): ``int(mask_prob · n + U[0,1))`` (mean exactly ``mask_prob · n``);
    * ``"bernoulli"`` (Hugging Face): each candidate independently with ``mask_prob``.

    ``max_predictions`` caps every mode. With ``whole_word=True`` (needs ``word_starts``) a
    word — a word-start token plus the non-start tokens after it — is selected whole or not
    at all: ``"exact"`` fills the token budget greedily over words in random order, skipping
    a word that would overflow it (BERT); ``"roberta"`` selects ``int(mask_prob · words + U)``
    words (fairseq); ``"bernoulli"`` selects each word with ``mask_prob``.

    Each selected token becomes [MASK] with ``mask_token_frac``, a random regular token with
    ``random_token_frac``, and stays unchanged otherwise (decided per token).

    Args:
        tokens: int64 [B, L]. gen: CPU ``torch.Generator``. vocab: :class:`NoiseVocab`.
        word_starts: bool [B, L], True where a token begins a word (whole-word only).

    Returns:
        ``input_ids`` int64 [B, L] (corrupted), ``labels`` int64 [B, L] (the original id at
        selected positions, -100 elsewhere), ``padding_mask`` bool [B, L] (True = real token).
    """
    check_tokens(tokens, vocab)
    check_gen(gen)
    check_open_unit("mask_prob", mask_prob, " (the share of tokens to predict, e.g. 0.15)")
    if mode not in MLM_MODES:
        raise ValueError(f"mode must be one of {MLM_MODES}, got {mode!r}")
    if max_predictions is not None and (not isinstance(max_predictions, int) or max_predictions < 1):
        raise ValueError(f"max_predictions must be a positive int or None, got {max_predictions!r}")
    check_fracs(mask_token_frac, random_token_frac)
    if whole_word:
        word_starts = check_mask_like(word_starts, tokens, "word_starts")

    device = tokens.device
    B, L = tokens.shape
    candidates = ~lookup(excluded_table(vocab, device), tokens)
    n_cand = candidates.sum(1)
    cap = L if max_predictions is None else max_predictions
    fracs = (mask_token_frac, random_token_frac)

    if not whole_word and mode != "bernoulli":
        idx, take = _select_token_slots(candidates, n_cand, mask_prob, mode, cap, gen)
        input_ids, labels = _corrupt_slots(tokens, idx, take, vocab, fracs, gen)
    else:
        if not whole_word:
            selected = _select_tokens(candidates, mask_prob, cap, gen)
        else:
            selected = _select_words(candidates, n_cand, word_starts, mask_prob, mode, cap, gen)
        input_ids, labels = _corrupt_mask(tokens, selected, vocab, fracs, gen)
    return {"input_ids": input_ids, "labels": labels, "padding_mask": tokens != vocab.pad_id}


def _corrupt_values(orig: torch.Tensor, vocab: NoiseVocab, fracs, gen) -> torch.Tensor:
    """80/10/10 (``fracs``) applied independently to every entry of ``orig``."""
    mask_token_frac, random_token_frac = fracs
    u = uniform(orig.shape, gen, orig.device)
    random_ids = random_regular(vocab, orig.shape, gen, orig.device)
    out = blend(u < mask_token_frac + random_token_frac, random_ids, orig)
    return blend(u < mask_token_frac, vocab.mask_id, out)


def _corrupt_slots(tokens, idx, take, vocab, fracs, gen):
    """Corrupt the positions ``idx[b, j]`` with ``take[b, j]`` (distinct per row); the 80/10/10
    draws are made for these positions only."""
    orig = tokens.gather(1, idx)
    input_ids = tokens.clone().scatter_(1, idx, blend(take, _corrupt_values(orig, vocab, fracs, gen), orig))
    labels = torch.full_like(tokens, IGNORE_INDEX).scatter_(1, idx, blend(take, orig, IGNORE_INDEX))
    return input_ids, labels


def _corrupt_mask(tokens, selected, vocab, fracs, gen):
    input_ids = blend(selected, _corrupt_values(tokens, vocab, fracs, gen), tokens)
    return input_ids, blend(selected, tokens, IGNORE_INDEX)


def _token_budget(n: torch.Tensor, mask_prob: float, mode: str, cap: int, gen) -> torch.Tensor:
    if mode == "exact":
        k = round_half_even(n.double() * mask_prob).clamp(min=1)
    else:  # roberta
        k = torch.floor(n.double() * mask_prob + uniform(n.shape, gen, n.device)).long()
    return torch.minimum(torch.minimum(k, n), torch.full_like(k, cap))


def _select_token_slots(candidates, n_cand, mask_prob, mode, cap, gen):
    """Exact / RoBERTa count: the ``k[b]`` candidates with the smallest random keys.

    Returns ``(idx [B, kmax], take [B, kmax])``: the chosen positions are ``idx[take]``."""
    B, L = candidates.shape
    keys = random_keys((B, L), gen, candidates.device, blocked=~candidates)
    k = _token_budget(n_cand, mask_prob, mode, cap, gen)
    kmin, kmax = int(k.min()), max(int(k.max()), 1)
    idx = keys.topk(kmax, dim=1, largest=False, sorted=kmin != kmax).indices
    take = torch.arange(kmax, device=candidates.device)[None, :] < k[:, None]
    return idx, take


def _select_tokens(candidates, mask_prob, cap, gen) -> torch.Tensor:
    """Bernoulli selection, capped at ``cap`` tokens per row."""
    B, L = candidates.shape
    keys = uniform((B, L), gen, candidates.device)
    chosen = candidates & (keys < mask_prob)
    if cap < L:  # keep a random subset of at most `cap`
        keys2 = random_keys((B, L), gen, candidates.device, blocked=~chosen)
        chosen = smallest_k(keys2, chosen.sum(1).clamp(max=cap))
    return chosen


def _select_words(candidates, n_cand, word_starts, mask_prob, mode, cap, gen) -> torch.Tensor:
    device = candidates.device
    B, L = candidates.shape
    starts = effective_word_starts(candidates, word_starts)
    widx = word_index(candidates, starts)
    n_words = starts.sum(1)
    W = max(int(n_words.max()), 1)
    word_len = torch.zeros((B, W + 1), dtype=torch.long, device=device)
    word_len.scatter_add_(1, torch.where(candidates, widx, W), candidates.long())
    word_len = word_len[:, :W]
    valid = torch.arange(W, device=device)[None, :] < n_words[:, None]

    # a random order of each row's words; invalid slots sort last
    keys = torch.where(valid, uniform((B, W), gen, device), float("inf"))
    order = keys.argsort(dim=1)
    lens = word_len.gather(1, order)
    ok = valid.gather(1, order)

    if mode == "exact":
        budget = _token_budget(n_cand, mask_prob, "exact", cap, gen)
        take = _greedy_fill(lens, ok, budget)
    else:
        if mode == "roberta":
            k_words = torch.floor(n_words.double() * mask_prob + uniform((B,), gen, device)).long()
            take = ok & (torch.arange(W, device=device)[None, :] < k_words[:, None])
        else:  # bernoulli
            take = ok & (uniform((B, W), gen, device) < mask_prob)
        if cap < L:  # max_predictions: keep the words, in random order, that fit the cap
            take = take & ((lens * take).cumsum(1) <= cap)
    chosen_words = torch.zeros((B, W), dtype=torch.bool, device=device)
    chosen_words.scatter_(1, order, take)
    return candidates & chosen_words.gather(1, widx.clamp(min=0))


def _greedy_fill(lens: torch.Tensor, ok: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """BERT's whole-word greedy fill, exactly, in a few vectorized passes.

    Over words in order: take a word if it still fits the remaining budget, else skip it.
    Each pass takes, among the words that fit the current slack, the longest prefix whose
    total fits; a skipped word never fits later (the slack only shrinks), so passes repeat
    until nothing more fits (at most ``max word length`` passes, usually one or two).
    """
    take = torch.zeros_like(ok)
    slack = budget.clone()
    while True:
        fits = ok & ~take & (lens <= slack[:, None])
        cum = (lens * fits).cumsum(1)
        new = fits & (cum <= slack[:, None])
        if not bool(new.any()):
            return take
        take |= new
        slack = slack - (lens * new).sum(1)
