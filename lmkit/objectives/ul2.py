"""UL2 mixture of denoisers (UL2 paper §3.1.2; U-PaLM §2.3) on an encoder–decoder.

Each row draws one denoiser: R (regular span corruption, μ=3/8, r=0.15), X (extreme:
μ=3/8 at r=0.5, μ=64 at r=0.15/0.5) or S (sequential: prefix LM). The encoder inputs
start with the mode token ([NLU] for R, [NLG] for X, [S2S] for S), then the denoiser's
inputs ending with EOS; the decoder predicts the targets (ending with EOS) behind a start
token (``<pad>``, as T5). Denoisers and their sampling weights are configurable; by
default the seven are equally likely.

Raw blocks are cut at the longest length whose inputs, for every denoiser of the mixture
and mode token included, fit in ``data.seq_len`` (S bounds it at ``seq_len − 1``); inputs
and targets vary in length across denoisers and are padded to the longest row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmkit.errors import ConfigError
from lmkit.noise import Denoiser, ul2_denoise
from lmkit.objectives._common import (
    add_decoder_inputs, check_open_unit, check_span_length, check_special_name, noise_vocab, seq2seq_loss,
)
from lmkit.objectives.base import Collator, LossOutput, Objective, check_chunked_ce
from lmkit.objectives.span_corruption import check_corruptible, check_sentinel_room, corrupted_lengths, span_counts

KINDS = ("R", "X", "S")


@dataclass
class DenoiserConfig:
    """One denoiser: ``kind`` R, X or S; mean span length and noise density (R and X only)."""

    kind: str = "R"
    mean_span: float = 3.0
    density: float = 0.15

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"objective.denoisers: kind must be one of R, X, S, got {self.kind!r}")
        if self.kind != "S":
            check_open_unit("denoisers.density", self.density, f" (denoiser {self.kind}, mean_span {self.mean_span})")
            check_span_length("denoisers.mean_span", self.mean_span)


def _ul2_defaults() -> list[DenoiserConfig]:
    return [DenoiserConfig("R", 3, 0.15), DenoiserConfig("R", 8, 0.15),
            DenoiserConfig("X", 3, 0.5), DenoiserConfig("X", 8, 0.5), DenoiserConfig("X", 64, 0.15),
            DenoiserConfig("X", 64, 0.5), DenoiserConfig("S")]


@dataclass
class UL2Config:
    """Options of ``ul2``. ``weights``: one per denoiser (null = equal); ``per_row``: draw a
    denoiser per row (true) or one per micro-batch."""

    name: str = "ul2"
    denoisers: list[DenoiserConfig] = field(default_factory=_ul2_defaults)
    weights: list[float] | None = None
    per_row: bool = True
    decoder_start_token: str = "<pad>"
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many target tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)
        if not self.denoisers:
            raise ConfigError("objective.denoisers is empty: list at least one denoiser")
        if self.weights is not None:
            w = list(self.weights)
            if len(w) != len(self.denoisers) or not all(0 <= x < float("inf") for x in w) or sum(w) <= 0:
                raise ConfigError(f"objective.weights must hold {len(self.denoisers)} finite non-negative numbers (one per "
                                  f"denoiser), not all zero, or be null; got {w}")
        check_special_name("decoder_start_token", self.decoder_start_token)

    def noise_denoisers(self) -> tuple[Denoiser, ...]:
        return tuple(Denoiser(d.kind, float(d.mean_span), float(d.density)) for d in self.denoisers)


def _max_inputs(d: DenoiserConfig, length: int) -> int:
    """Longest encoder input (mode token included) the denoiser gives on ``length`` tokens."""
    if d.kind == "S":
        return 1 + (length - 1) + 1  # mode, longest prefix (n − 1), EOS
    return 1 + corrupted_lengths(length, d.density, d.mean_span)[0]


def ul2_raw_length(cfg: UL2Config, seq_len: int) -> int:
    length = seq_len
    while length > 2 and max(_max_inputs(d, length) for d in cfg.denoisers) > seq_len:
        length -= 1
    if length < 2 or max(_max_inputs(d, length) for d in cfg.denoisers) > seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is too short for objective '{cfg.name}': every denoiser needs a "
                          f"chunk of at least 2 tokens plus its mode token and EOS. Raise data.seq_len.")
    for d in cfg.denoisers:
        if d.kind != "S":
            check_corruptible(cfg.name, length, d.density, d.mean_span, seq_len)
    return length


class UL2Collator(Collator):
    def __init__(self, cfg: UL2Config, vocab, start_id: int):
        self.vocab, self.start_id = vocab, start_id
        self.denoisers, self.weights, self.per_row = cfg.noise_denoisers(), cfg.weights, cfg.per_row

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = ul2_denoise(blocks, gen, self.vocab, self.denoisers, self.weights, self.per_row)
        return add_decoder_inputs(out, self.start_id, self.vocab.pad_id)


class UL2(Objective):
    """UL2's mixture of denoisers."""

    kinds = ("encoder_decoder",)
    needs = frozenset({"decoder_input_ids"})

    def __init__(self, cfg: UL2Config, tokenizer):
        super().__init__(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.vocab = noise_vocab(tokenizer)
        self.start_id = tokenizer.special_id(cfg.decoder_start_token)
        modes = (("[NLU]", self.vocab.nlu_id), ("[NLG]", self.vocab.nlg_id), ("[S2S]", self.vocab.s2s_id))
        missing = [n for n, v in modes if v is None]
        if missing:
            raise ConfigError(f"objective 'ul2' needs the mode tokens {', '.join(missing)}, which the tokenizer lacks")

    @classmethod
    def sentinels_needed(cls, cfg: UL2Config, seq_len: int) -> int:
        length = ul2_raw_length(cfg, seq_len)
        return max([span_counts(length, d.density, d.mean_span)[1] for d in cfg.denoisers if d.kind != "S"], default=0)

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        length = ul2_raw_length(self.cfg, seq_len)
        check_sentinel_room(self.cfg.name, self.tokenizer, self.sentinels_needed(self.cfg, seq_len))
        return length, length

    def make_collator(self) -> Collator:
        return UL2Collator(self.cfg, self.vocab, self.start_id)

    def loss(self, model, batch) -> LossOutput:
        return seq2seq_loss(self, model, batch)
