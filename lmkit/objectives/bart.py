"""BART denoising (fairseq ``data/denoising_dataset.py``; the pretraining flags of fairseq #1899).

Each example is ``<bos> block <eos>`` (blocks of ``seq_len − 2`` tokens), noised by
:func:`lmkit.noise.bart_noise`: sentence permutation, text infilling (Poisson spans, each
collapsed to one [MASK], zero-length spans inserting one), optional token deletion and
document rotation; special tokens (BOS, EOS, the EOS between packed documents) are never
noised. The encoder reads the noised row, the decoder reconstructs the original: its
inputs are the original shifted right behind ``<eos>`` (fairseq's and Hugging Face's BART
start token), and the loss covers every original token.

Sentence ends (for permutation): a '.', '!' or '?' token followed by whitespace, computed
from the byte values for the byte tokenizer and from the decoded vocabulary for trained
tokenizers (see :func:`lmkit.objectives._common.sentence_end_tables`); a special token
also ends a sentence. WordPiece drops whitespace, so there a sentence ends at any of the
three marks followed by a new word.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.errors import ConfigError
from lmkit.noise import bart_noise
from lmkit.objectives._common import (
    add_decoder_inputs, check_special_name, check_unit, frame, noise_vocab, sentence_end_tables, sentence_ends,
    seq2seq_loss, too_short,
)
from lmkit.objectives.base import Collator, LossOutput, Objective, check_chunked_ce


@dataclass
class BARTDenoisingConfig:
    """Options of ``bart_denoising``. Defaults: the BART paper's final recipe (text infilling
    of 30% of words with Poisson(3) spans, 10% random masks, all sentences permuted; no
    deletion, no rotation). The released large run used ``poisson_lambda=3.5``."""

    name: str = "bart_denoising"
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    random_ratio: float = 0.1
    permute_sentence_ratio: float = 1.0
    delete_ratio: float = 0.0
    rotate_ratio: float = 0.0
    decoder_start_token: str = "<eos>"
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many target tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)
        check_unit("mask_ratio", self.mask_ratio, below_one=True)
        if isinstance(self.poisson_lambda, bool) or not 0 < self.poisson_lambda < float("inf"):
            raise ConfigError("objective.poisson_lambda must be > 0 (mean span length in words, e.g. 3.0), "
                              f"got {self.poisson_lambda!r}")
        check_unit("random_ratio", self.random_ratio)
        check_unit("permute_sentence_ratio", self.permute_sentence_ratio)
        check_unit("delete_ratio", self.delete_ratio, below_one=True)
        check_unit("rotate_ratio", self.rotate_ratio)
        check_special_name("decoder_start_token", self.decoder_start_token)
        if not (self.mask_ratio or self.permute_sentence_ratio or self.delete_ratio or self.rotate_ratio):
            raise ConfigError("objective 'bart_denoising' with every noise ratio at 0 only learns to copy its input; "
                              "set objective.mask_ratio (e.g. 0.3) or another noise")


class BARTCollator(Collator):
    def __init__(self, cfg: BARTDenoisingConfig, vocab, tokenizer, tables, start_id: int):
        self.cfg, self.vocab, self.tokenizer, self.tables, self.start_id = cfg, vocab, tokenizer, tables, start_id

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        tokens = frame(blocks, self.vocab.bos_id, self.vocab.eos_id)
        ends = sentence_ends(tokens, self.tables) if cfg.permute_sentence_ratio > 0 else None
        out = bart_noise(tokens, gen, self.vocab, self.tokenizer.word_starts(tokens), mask_ratio=cfg.mask_ratio,
                         poisson_lambda=cfg.poisson_lambda, random_ratio=cfg.random_ratio,
                         permute_sentence_ratio=cfg.permute_sentence_ratio, sentence_ends=ends,
                         delete_ratio=cfg.delete_ratio, rotate_ratio=cfg.rotate_ratio)
        return add_decoder_inputs(out, self.start_id, self.vocab.pad_id)


class BARTDenoising(Objective):
    """BART's denoising autoencoder on an encoder–decoder."""

    kinds = ("encoder_decoder",)
    needs = frozenset({"decoder_input_ids"})

    def __init__(self, cfg: BARTDenoisingConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.vocab = noise_vocab(tokenizer)
        self.start_id = tokenizer.special_id(cfg.decoder_start_token)
        self.tables = sentence_end_tables(tokenizer) if cfg.permute_sentence_ratio > 0 else None

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if seq_len < 4:
            raise too_short(self.cfg.name, seq_len, 4, "<bos>, two tokens to noise, <eos>")
        return seq_len - 2, seq_len - 2

    def make_collator(self) -> Collator:
        return BARTCollator(self.cfg, self.vocab, self.tokenizer, self.tables, self.start_id)

    def loss(self, model, batch) -> LossOutput:
        return seq2seq_loss(self, model, batch)
