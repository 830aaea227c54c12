"""Prefix LM (T5 ``prefix_lm``; UniLM's sequence-to-sequence mask for the decoder-only form).

Every row is split at a point uniform in [1, n−1]; the prefix is read bidirectionally,
the rest is predicted left to right, and only the rest is in the loss.

* ``form: decoder`` — one decoder-only stack (GPT) over windows of ``seq_len + 1`` tokens
  (as causal LM) with a per-row attention mask: every position sees the whole prefix, the
  rest causally (:func:`lmkit.noise.prefix_lm`).
* ``form: encoder_decoder`` — T5's form: the encoder reads ``prefix <eos>``, the decoder
  predicts ``rest <eos>`` (:func:`lmkit.noise.prefix_lm_seq2seq`); blocks of ``seq_len``.
* ``form: auto`` (default) — whichever the model's kind is.

Two names: ``prefix_lm`` (default model gpt_tiny) and ``prefix_lm_seq2seq`` (the
encoder–decoder form, default model t5_tiny).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.errors import ConfigError
from lmkit.noise import prefix_lm, prefix_lm_attention_mask, prefix_lm_seq2seq
from lmkit.objectives._common import (
    add_decoder_inputs, check_special_name, mask_or_none, noise_vocab, seq2seq_loss, too_short,
)
from lmkit.objectives.base import Collator, LossOutput, Objective, check_chunked_ce

FORMS = ("auto", "decoder", "encoder_decoder")


@dataclass
class PrefixLMConfig:
    """Options of ``prefix_lm``: ``form`` auto | decoder | encoder_decoder."""

    name: str = "prefix_lm"
    form: str = "auto"
    decoder_start_token: str = "<pad>"  # encoder–decoder form only (T5: <pad>)
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many target tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)
        if self.form not in FORMS:
            raise ConfigError(f"objective.form must be one of {', '.join(FORMS)}, got {self.form!r}")
        check_special_name("decoder_start_token", self.decoder_start_token)


@dataclass
class PrefixLMSeq2SeqConfig(PrefixLMConfig):
    """Options of ``prefix_lm_seq2seq``: the encoder–decoder form."""

    name: str = "prefix_lm_seq2seq"
    form: str = "encoder_decoder"


class PrefixLMCollator(Collator):
    def __init__(self, vocab, form: str, start_id: int):
        self.vocab, self.form, self.start_id = vocab, form, start_id

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        if self.form == "decoder":  # the [L, L] mask is built from prefix_len on the model's device
            return prefix_lm(blocks, gen, self.vocab, dense_mask=False)
        return add_decoder_inputs(prefix_lm_seq2seq(blocks, gen, self.vocab), self.start_id, self.vocab.pad_id)


class PrefixLM(Objective):
    """Prefix LM in decoder-only or encoder–decoder form (``cfg.form``)."""

    kinds = ("decoder", "encoder_decoder")

    @classmethod
    def needs_for(cls, cfg, kind: str | None) -> frozenset[str]:
        """Decoder form: an attention mask (bidirectional prefix); encoder–decoder form: decoder inputs."""
        form = getattr(cfg, "form", "auto")
        form = kind if form == "auto" else form
        if form == "decoder":
            return frozenset({"attn_mask"})
        if form == "encoder_decoder":
            return frozenset({"decoder_input_ids"})
        return frozenset()

    def __init__(self, cfg: PrefixLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.vocab = noise_vocab(tokenizer)
        self.start_id = tokenizer.special_id(cfg.decoder_start_token)
        self.form = "decoder" if cfg.form == "auto" else cfg.form  # "auto" is settled by attach()

    def attach(self, model) -> None:
        kind = getattr(model, "kind", None)
        if self.cfg.form == "auto":
            if kind not in ("decoder", "encoder_decoder"):
                raise ConfigError(f"objective '{self.cfg.name}' needs a decoder or encoder_decoder model, "
                                  f"got kind {kind}")
            self.form = kind
        elif kind != self.form:
            raise ConfigError(
                f"objective.form={self.form} does not fit model kind {kind} ({type(model).__name__}): set "
                f"objective.form={kind} (or auto), or choose a {self.form} architecture."
            )

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if self.form == "decoder":
            return seq_len + 1, seq_len
        if seq_len < 2:
            raise too_short(self.cfg.name, seq_len, 2, "a prefix token and a target token")
        return seq_len, seq_len

    def make_collator(self) -> Collator:
        return PrefixLMCollator(self.vocab, self.form, self.start_id)

    def loss(self, model, batch) -> LossOutput:
        if "decoder_input_ids" in batch:
            return seq2seq_loss(self, model, batch)
        attn_mask = batch.get("attn_mask")
        if attn_mask is None:
            attn_mask = prefix_lm_attention_mask(batch["prefix_len"], batch["input_ids"].shape[1])
        hidden = model(batch["input_ids"], padding_mask=mask_or_none(batch.get("padding_mask")), attn_mask=attn_mask)
        return self.lm_head_nll(model, hidden, batch["labels"], self.cfg.chunked_ce)
