"""UL2 mixture of denoisers (UL2 paper §3.1.2; U-PaLM §2.3), encoder-decoder format.

Denoisers: R (regular span corruption) (μ=3, r=0.15), (μ=8, r=0.15); X (extreme)
(μ=3, r=0.5), (μ=8, r=0.5), (μ=64, r=0.15), (μ=64, r=0.5); S (sequential) = prefix LM.
Each example's inputs start with its mode token: R → [NLU], X → [NLG], S → [S2S]. R and X
are :func:`~lmkit.noise.span_corruption.span_corruption` with their own (μ, r); S is
:func:`~lmkit.noise.prefix_lm.prefix_lm_seq2seq` (split uniform in [1, n−1]). All rows are
built in one pass from per-denoiser span plans.

The mixture weights are configurable; by default the seven denoisers are equally likely
(the paper's exact sampling rates are a training choice, set them through ``weights``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.noise._common import IGNORE_INDEX, check_gen, check_tokens, real_lengths
from lmkit.noise.prefix_lm import split_points
from lmkit.noise.span_corruption import (
    assemble_spans, below, check_sentinels, check_spans_fit, noise_counts, span_lengths,
)
from lmkit.noise.vocab import NoiseVocab

MODE_TOKEN_FIELD = {"R": "nlu_id", "X": "nlg_id", "S": "s2s_id"}


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: ``kind`` "R", "X" or "S"; span corruption's mean span length and
    noise density (ignored for S)."""

    kind: str
    mean_span: float = 3.0
    density: float = 0.15

    def __post_init__(self):
        if self.kind not in MODE_TOKEN_FIELD:
            raise ValueError(f"Denoiser kind must be 'R', 'X' or 'S', got {self.kind!r}")

    @property
    def name(self) -> str:
        return "S" if self.kind == "S" else f"{self.kind}(mu={self.mean_span:g},r={self.density:g})"


UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 3, 0.15), Denoiser("R", 8, 0.15),
    Denoiser("X", 3, 0.5), Denoiser("X", 8, 0.5), Denoiser("X", 64, 0.15), Denoiser("X", 64, 0.5),
    Denoiser("S"),
)


def ul2_denoise(
    tokens: torch.Tensor,
    gen: torch.Generator,
    vocab: NoiseVocab,
    denoisers: tuple[Denoiser, ...] | list[Denoiser] = UL2_DENOISERS,
    weights: list[float] | tuple[float, ...] | None = None,
    per_row: bool = True,
) -> dict[str, torch.Tensor]:
    """Apply a denoiser drawn from the mixture to each row (``per_row``) or to the whole batch.

    Args:
        tokens: int64 [B, L] raw chunks, right-padded with ``pad_id``.
        denoisers: the mixture; weights: their sampling weights (default: equal).

    Returns:
        ``input_ids`` int64 [B, I]: mode token, then the denoiser's inputs (ending with EOS),
        then ``pad_id``; ``padding_mask`` bool [B, I] (True = real); ``labels`` int64
        [B, T]: the denoiser's targets (ending with EOS), then -100; ``denoiser`` int64 [B]:
        index into ``denoisers`` of each row's denoiser. I and T are the longest row's.
    """
    id_range = check_tokens(tokens, vocab)
    check_gen(gen)
    denoisers = tuple(denoisers)
    if not denoisers or not all(isinstance(d, Denoiser) for d in denoisers):
        raise ValueError("denoisers must be a non-empty sequence of Denoiser, e.g. lmkit.noise.ul2.UL2_DENOISERS")
    if weights is None:
        weights = [1.0] * len(denoisers)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (len(denoisers),) or bool((w < 0).any()) or float(w.sum()) <= 0 or not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"weights must be {len(denoisers)} non-negative finite numbers, not all zero (one per denoiser), "
            f"got {list(weights)}"
        )
    for d in denoisers:
        if getattr(vocab, MODE_TOKEN_FIELD[d.kind]) is None:
            raise ValueError(
                f"denoiser {d.name} needs the mode token {MODE_TOKEN_FIELD[d.kind]} but the vocabulary has none; "
                "use a tokenizer with [NLU]/[NLG]/[S2S] special tokens"
            )

    B = tokens.shape[0]
    device = tokens.device
    lengths = real_lengths(tokens, vocab.pad_id, id_range=id_range)
    if int(lengths.min()) < 2:
        raise ValueError(
            f"a row has {int(lengths.min())} real token(s); UL2 needs at least 2 real tokens per row "
            "(one noise / prefix, one kept): drop or merge such short rows"
        )
    draws = 1 if not per_row else B
    choice = torch.multinomial(w, draws, replacement=True, generator=gen).to(device)
    if not per_row:
        choice = choice.expand(B).clone()

    # every denoiser is a span plan (S: one clean span = the prefix, one noise span = the rest,
    # no sentinels); the plans are drawn per denoiser and assembled for the whole batch at once
    kinds = [d.kind for d in denoisers]
    spans = torch.tensor([k != "S" for k in kinds], device=device)[choice]
    density = torch.tensor([d.density for d in denoisers], dtype=torch.float64, device=device)[choice]
    mean = torch.tensor([float(d.mean_span) for d in denoisers], dtype=torch.float64, device=device)[choice]
    n_noise, n_spans = noise_counts(lengths, density, mean)
    _check_span_rows(tokens, lengths, n_noise, n_spans, spans, denoisers, choice, vocab, id_range[1])
    plans = []
    for d_idx, d in enumerate(denoisers):
        rows = (choice == d_idx).nonzero().flatten()
        if rows.numel() == 0:
            continue
        if d.kind == "S":
            s = split_points(lengths[rows], gen)
            plans.append((rows, s[:, None], (lengths[rows] - s)[:, None]))
        else:
            plans.append((rows, *span_lengths(lengths[rows], n_noise[rows], n_spans[rows], gen)))
    S = max(p[1].shape[1] for p in plans)
    clean = torch.zeros((B, S), dtype=torch.long, device=device)
    noise = torch.zeros((B, S), dtype=torch.long, device=device)
    for rows, c, n in plans:
        clean[rows, : c.shape[1]] = c
        noise[rows, : n.shape[1]] = n
    mode = torch.tensor([getattr(vocab, MODE_TOKEN_FIELD[k]) for k in kinds], device=device)[choice]
    input_ids, in_len = assemble_spans(tokens, clean, noise, vocab, False, spans, lead=mode)
    labels, _ = assemble_spans(tokens, clean, noise, vocab, True, spans, fill=IGNORE_INDEX)
    return {"input_ids": input_ids, "padding_mask": below(in_len, input_ids.shape[1]), "labels": labels,
            "denoiser": choice}


def _check_span_rows(tokens, lengths, n_noise, n_spans, spans, denoisers, choice, vocab, max_id):
    """Span corruption's checks, on the rows of R and X denoisers."""
    bad = spans & (n_spans > lengths - n_noise)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        d = denoisers[int(choice[i])]
        check_spans_fit(lengths[i:i + 1], n_noise[i:i + 1], n_spans[i:i + 1], d.density, d.mean_span)
    if bool(spans.any()):
        d = denoisers[int(choice[int(torch.where(spans, n_spans, 0).argmax())])]
        rows = spans.nonzero().flatten()
        sub = tokens if max_id < vocab.first_sentinel_id else tokens[rows]  # no scan needed below the sentinels
        check_sentinels(sub, lengths[rows], n_spans[rows], vocab, d.density, d.mean_span, max_id)
