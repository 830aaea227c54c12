"""Prefix LM (T5 ``prefix_lm``, ``random_prefix_noise_mask``) and UniLM attention masks.

Prefix LM: each row of ``n`` real tokens is split at a point ``s`` drawn uniformly from
[1, n−1]; the first ``s`` tokens are the prefix (seen bidirectionally), the rest is
predicted left to right, and only the rest is in the loss.

UniLM masks (microsoft/unilm ``seq2seq_loader.py``): bidirectional (all ones),
left-to-right (lower triangular), seq2seq (every query sees segment A; queries in segment
B also see B up to themselves). A prefix-LM mask is the seq2seq mask with A = the prefix.
Masks are bool, True = may attend (the convention of ``lmkit.models``).
"""
from __future__ import annotations

import torch

from lmkit.noise._common import IGNORE_INDEX, check_gen, check_tokens, compact, real_lengths, uniform
from lmkit.noise.vocab import NoiseVocab

UNILM_KINDS = ("bidirectional", "left_to_right", "seq2seq")


def unilm_mask(
    kind: str,
    length: int,
    *,
    batch: int = 1,
    segment_a_len: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """A UniLM self-attention mask, bool [batch, length, length] (True = may attend).

    Args:
        kind: ``"bidirectional"``, ``"left_to_right"`` or ``"seq2seq"``.
        segment_a_len: int64 [batch], length of segment A (seq2seq only): query ``i`` may
            attend key ``j`` iff ``j < a`` or ``a <= j <= i``.
        padding_mask: optional bool [batch, length], True for real tokens; padded keys are
            masked out (every query still sees itself, so no row is empty).
    """
    if kind not in UNILM_KINDS:
        raise ValueError(f"kind must be one of {UNILM_KINDS}, got {kind!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if padding_mask is not None:
        if padding_mask.shape[-1] != length or padding_mask.ndim != 2:
            raise ValueError(f"padding_mask must be bool [batch, {length}], got {tuple(padding_mask.shape)}")
        batch, device = padding_mask.shape[0], padding_mask.device if device is None else device
    if kind == "seq2seq":
        if segment_a_len is None:
            raise ValueError("kind='seq2seq' needs segment_a_len: the length of segment A for each row, int64 [batch]")
        segment_a_len = torch.as_tensor(segment_a_len, dtype=torch.long, device=device)
        if segment_a_len.ndim == 0:
            segment_a_len = segment_a_len.expand(batch)
        batch, device = segment_a_len.shape[0], segment_a_len.device
        if int(segment_a_len.min()) < 0 or int(segment_a_len.max()) > length:
            raise ValueError(f"segment_a_len must be in [0, {length}], got {segment_a_len.tolist()}")
    tril = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    if kind == "bidirectional":
        mask = torch.ones((batch, length, length), dtype=torch.bool, device=device)
    elif kind == "left_to_right":
        mask = tril.expand(batch, length, length).clone()
    else:  # key j visible iff j < a (segment A) or j <= i (causal)
        in_a = torch.arange(length, device=device)[None, :] < segment_a_len[:, None]
        mask = torch.logical_or(tril[None], in_a[:, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask.to(device=device, dtype=torch.bool)[:, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=device)[None]
    return mask


def prefix_lm(tokens: torch.Tensor, gen: torch.Generator, vocab: NoiseVocab, *,
              dense_mask: bool = True) -> dict[str, torch.Tensor]:
    """Decoder-only prefix LM on blocks of ``L + 1`` tokens (like causal LM's blocks).

    A row of ``n`` real tokens is split at ``s`` uniform in [1, n−1]: tokens ``[0, s)`` are
    the prefix, tokens ``[s, n)`` are predicted. As in causal LM, ``input_ids`` are
    ``tokens[:, :-1]`` and position ``t`` predicts token ``t + 1``.

    Args:
        tokens: int64 [B, L + 1], right-padded with ``pad_id``; rows need >= 2 real tokens.

    Returns:
        ``input_ids`` int64 [B, L]; ``labels`` int64 [B, L]: ``tokens[t + 1]`` where
        ``t + 1 >= s`` (the rest), -100 on the prefix and padding; ``attn_mask`` bool
        [B, L, L]: query ``t`` may attend key ``j`` iff ``j < s`` or ``j <= t``;
        ``padding_mask`` bool [B, L] (True = real); ``prefix_len`` int64 [B] (= s).
        With ``dense_mask=False`` there is no ``attn_mask``: it is a function of
        ``prefix_len`` (:func:`prefix_lm_attention_mask`), cheaper to build where it is used
        than to ship (256 rows of 512 make 67 MB).
    """
    check_tokens(tokens, vocab)
    check_gen(gen)
    n = real_lengths(tokens, vocab.pad_id)
    if tokens.shape[1] < 3 or int(n.min()) < 2:
        raise ValueError(
            f"prefix LM needs rows of at least 2 real tokens (one prefix, one target) and blocks of at least 3; "
            f"got blocks of {tokens.shape[1]} with a row of {int(n.min())} real tokens"
        )
    B, N = tokens.shape
    L = N - 1
    s = split_points(n, gen)
    input_ids, targets = tokens[:, :-1], tokens[:, 1:]
    t = torch.arange(L, device=tokens.device)[None, :]
    in_loss = (t + 1 >= s[:, None]) & (t + 1 < n[:, None])
    labels = torch.where(in_loss, targets, IGNORE_INDEX)
    padding_mask = t < (n - 1)[:, None]
    out = {"input_ids": input_ids, "labels": labels, "padding_mask": padding_mask, "prefix_len": s}
    if dense_mask:
        out["attn_mask"] = prefix_lm_attention_mask(s, L)
    return out


def prefix_lm_attention_mask(prefix_len: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, length, length] prefix-LM mask: query ``t`` sees key ``j`` iff ``j < s`` or ``j <= t``."""
    return unilm_mask("seq2seq", length, segment_a_len=prefix_len)


def prefix_lm_seq2seq(tokens: torch.Tensor, gen: torch.Generator, vocab: NoiseVocab) -> dict[str, torch.Tensor]:
    """Encoder-decoder prefix LM (T5 ``prefix_lm``): inputs = prefix + EOS, targets = rest + EOS.

    Args:
        tokens: int64 [B, L], right-padded with ``pad_id``; rows need >= 2 real tokens.

    Returns:
        ``input_ids`` int64 [B, I] (padded with ``pad_id``), ``padding_mask`` bool [B, I],
        ``labels`` int64 [B, T] (padded with -100), ``prefix_len`` int64 [B]; I and T are
        the longest row's (each at most L).
    """
    check_tokens(tokens, vocab)
    check_gen(gen)
    n = real_lengths(tokens, vocab.pad_id)
    if int(n.min()) < 2:
        raise ValueError(f"prefix LM needs rows of at least 2 real tokens (one prefix, one target), got {int(n.min())}")
    B, L = tokens.shape
    s = split_points(n, gen)
    pos = torch.arange(L, device=tokens.device)[None, :]
    inputs, _ = compact(tokens, pos < s[:, None], int(s.max()) + 1, vocab.pad_id)
    inputs.scatter_(1, s[:, None], torch.full_like(s[:, None], vocab.eos_id))
    rest = n - s
    targets, _ = compact(tokens, (pos >= s[:, None]) & (pos < n[:, None]), int(rest.max()) + 1, IGNORE_INDEX)
    targets.scatter_(1, rest[:, None], torch.full_like(rest[:, None], vocab.eos_id))
    padding_mask = torch.arange(inputs.shape[1], device=tokens.device)[None, :] <= s[:, None]
    return {"input_ids": inputs, "padding_mask": padding_mask, "labels": targets, "prefix_len": s}


def split_points(n: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform integers in [1, n−1] per row (int64 [B])."""
    u = uniform(n.shape, gen, n.device)
    return 1 + torch.minimum(torch.floor(u * (n - 1).double()).long(), n - 2)
