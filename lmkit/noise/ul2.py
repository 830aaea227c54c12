"""UL2 mixture of denoisers (UL2 paper §3.1.2; U-PaLM §2.3), encoder-decoder format.

Denoisers: R (regular span corruption) (μ=3, r=0.15), (μ=8, r=0.15); X (extreme)
(μ=3, r=0.5), (μ=8, r=0.5), (μ=64, r=0.15), (μ=64, r=0.5); S (sequential) = prefix LM.
Each example's inputs start with its mode token: R → [NLU], X → [NLG], S → [S2S]. R and X
reuse :func:`~lmkit.noise.span_corruption.span_corruption` with their own (μ, r); S uses
:func:`~lmkit.noise.prefix_lm.prefix_lm_seq2seq` (split uniform in [1, n−1]).

The mixture weights are configurable; by default the seven denoisers are equally likely
(the paper's exact sampling rates are a training choice, set them through ``weights``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.noise._common import IGNORE_INDEX, check_gen, check_tokens
from lmkit.noise.prefix_lm import prefix_lm_seq2seq
from lmkit.noise.span_corruption import span_corruption
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
    check_tokens(tokens, vocab)
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
    draws = 1 if not per_row else B
    choice = torch.multinomial(w, draws, replacement=True, generator=gen).to(device)
    if not per_row:
        choice = choice.expand(B).clone()

    parts = []
    for d_idx, d in enumerate(denoisers):
        rows = (choice == d_idx).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sub = tokens[rows]
        if d.kind == "S":
            out = prefix_lm_seq2seq(sub, gen, vocab)
        else:
            out = span_corruption(sub, gen, vocab, d.density, d.mean_span)
        mode = torch.full((rows.numel(), 1), getattr(vocab, MODE_TOKEN_FIELD[d.kind]), dtype=torch.long, device=device)
        inputs = torch.cat([mode, out["input_ids"]], dim=1)
        pmask = torch.cat([torch.ones_like(mode, dtype=torch.bool), out["padding_mask"]], dim=1)
        parts.append((rows, inputs, pmask, out["labels"]))

    I = max(p[1].shape[1] for p in parts)
    T = max(p[3].shape[1] for p in parts)
    input_ids = torch.full((B, I), vocab.pad_id, dtype=torch.long, device=device)
    padding_mask = torch.zeros((B, I), dtype=torch.bool, device=device)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
    for rows, inputs, pmask, lab in parts:
        input_ids[rows, : inputs.shape[1]] = inputs
        padding_mask[rows, : pmask.shape[1]] = pmask
        labels[rows, : lab.shape[1]] = lab
    return {"input_ids": input_ids, "padding_mask": padding_mask, "labels": labels, "denoiser": choice}
