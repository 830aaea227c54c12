"""T5 span corruption (google-research/text-to-text-transfer-transformer ``preprocessors.py``).

Raw chunks are cut at the length that ``random_spans_helper`` gives for ``data.seq_len``
inputs (128 → 141 raw tokens, 29 targets), so the encoder inputs are exactly
``data.seq_len`` tokens (non-noise tokens, one sentinel per noise span, EOS) with no
padding. Sentinels count down from the top of the vocabulary (``<extra_id_0>`` = V−1);
the tokenizer is built with enough of them (:meth:`SpanCorruption.sentinels_needed`).
The decoder reads the targets shifted right behind a start token (``<pad>``, as T5), and
the loss covers every target token, sentinels and EOS included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.errors import ConfigError
from lmkit.noise import random_spans_helper, span_corruption
from lmkit.noise.span_corruption import noise_counts
from lmkit.objectives._common import (
    add_decoder_inputs, check_open_unit, check_span_length, check_special_name, noise_vocab, seq2seq_loss,
)
from lmkit.objectives.base import Collator, LossOutput, Objective, check_chunked_ce


@dataclass
class SpanCorruptionConfig:
    """Options of ``span_corruption``. Defaults: T5 (noise_density 0.15, mean span 3)."""

    name: str = "span_corruption"
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    decoder_start_token: str = "<pad>"  # T5 starts the decoder with <pad>
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many target tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)
        check_open_unit("noise_density", self.noise_density, " (the share of tokens to corrupt, e.g. 0.15)")
        check_span_length("mean_noise_span_length", self.mean_noise_span_length)
        check_special_name("decoder_start_token", self.decoder_start_token)


def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of ``length`` tokens (T5's formulas)."""
    n_noise, n_spans = noise_counts(torch.tensor([length]), density, mean_span)
    return int(n_noise[0]), int(n_spans[0])


def corrupted_lengths(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, of span corruption on ``length`` tokens."""
    n_noise, n_spans = span_counts(length, density, mean_span)
    return length - n_noise + n_spans + 1, n_noise + n_spans + 1


def check_corruptible(objective: str, length: int, density: float, mean_span: float, seq_len: int) -> None:
    if length < 2:
        raise ConfigError(
            f"data.seq_len={seq_len} is too short for objective '{objective}': the raw chunk would hold {length} "
            f"token(s), and span corruption needs at least 2 (one noise, one kept). Raise data.seq_len."
        )
    n_noise, n_spans = span_counts(length, density, mean_span)
    if n_spans > length - n_noise:
        raise ConfigError(
            f"objective '{objective}': noise density {density} with mean span length {mean_span} asks for "
            f"{n_spans} noise spans in a chunk of {length} tokens that has only {length - n_noise} other tokens to "
            f"separate them. Lower the noise density, raise the mean span length, or raise data.seq_len."
        )


def check_sentinel_room(objective: str, tokenizer, needed: int) -> None:
    have = int(getattr(tokenizer, "num_sentinels", 0))
    if have < needed:
        raise ConfigError(
            f"objective '{objective}' needs {needed} sentinel tokens at the top of the vocabulary but the tokenizer "
            f"has {have}: the vocabulary has no room for them. Use a built-in tokenizer (lmkit raises "
            f"tokenizer.num_sentinels automatically) or set tokenizer.num_sentinels={needed}."
        )


def raw_length(cfg: SpanCorruptionConfig, seq_len: int) -> int:
    """Raw chunk length whose corrupted inputs are exactly ``seq_len`` (at most, for tiny lengths)."""
    if seq_len < 2:
        raise ConfigError(f"data.seq_len={seq_len} is too short for objective '{cfg.name}': it needs at least 2. "
                          "Raise data.seq_len.")
    length, _ = random_spans_helper(seq_len, cfg.noise_density, cfg.mean_noise_span_length)
    # T5's helper ignores the clamp n_noise >= 1, n_spans >= 1; for tiny lengths step down until it fits
    while length > 2 and corrupted_lengths(length, cfg.noise_density, cfg.mean_noise_span_length)[0] > seq_len:
        length -= 1
    check_corruptible(cfg.name, length, cfg.noise_density, cfg.mean_noise_span_length, seq_len)
    return length


class SpanCorruptionCollator(Collator):
    def __init__(self, cfg: SpanCorruptionConfig, vocab, start_id: int):
        self.cfg, self.vocab, self.start_id = cfg, vocab, start_id

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = span_corruption(blocks, gen, self.vocab, self.cfg.noise_density, self.cfg.mean_noise_span_length)
        return add_decoder_inputs(out, self.start_id, self.vocab.pad_id)


class SpanCorruption(Objective):
    """T5's span corruption on an encoder–decoder."""

    kinds = ("encoder_decoder",)
    needs = frozenset({"decoder_input_ids"})

    def __init__(self, cfg: SpanCorruptionConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.vocab = noise_vocab(tokenizer)
        self.start_id = tokenizer.special_id(cfg.decoder_start_token)

    @classmethod
    def sentinels_needed(cls, cfg: SpanCorruptionConfig, seq_len: int) -> int:
        """Sentinels for one chunk (the tokenizer is built with at least this many)."""
        length = raw_length(cfg, seq_len)
        return span_counts(length, cfg.noise_density, cfg.mean_noise_span_length)[1]

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        length = raw_length(self.cfg, seq_len)
        check_sentinel_room(self.cfg.name, self.tokenizer, self.sentinels_needed(self.cfg, seq_len))
        return length, length

    def make_collator(self) -> Collator:
        return SpanCorruptionCollator(self.cfg, self.vocab, self.start_id)

    def loss(self, model, batch) -> LossOutput:
        return seq2seq_loss(self, model, batch)
