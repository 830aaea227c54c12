"""Masked language modelling (BERT; RoBERTa's and Hugging Face's selection rules as modes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.noise import mlm_mask
from lmkit.objectives._common import check_mlm_fields, frame, mask_or_none, noise_vocab, too_short
from lmkit.models.layers import document_ids_from_separators
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective, document_kwargs


@dataclass
class MLMConfig:
    """Options of ``mlm``. Defaults: BERT (google-research/bert ``create_pretraining_data.py``).

    ``mode``: ``exact`` (BERT: ``min(max_predictions, max(1, round(mask_prob · n)))``),
    ``roberta`` (fairseq: ``int(mask_prob · n + U[0,1))``) or ``bernoulli`` (Hugging Face).
    Masks are drawn afresh every time a block is served (the generator is seeded by the
    block's stream position, which differs every epoch), i.e. RoBERTa's dynamic masking in
    every mode. ``whole_word``: a word is masked whole or not at all.
    """

    name: str = "mlm"
    mask_prob: float = 0.15
    mode: str = "exact"
    max_predictions: int | None = None  # BERT used 20 at 128 tokens, 80 at 512; null = no cap
    whole_word: bool = False
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    document_mask: bool = False  # attend only within each EOS-separated document; positions restart

    def __post_init__(self):
        check_mlm_fields(self)


def apply_mlm(tokens: torch.Tensor, gen: torch.Generator, cfg, vocab, tokenizer) -> dict[str, torch.Tensor]:
    """:func:`lmkit.noise.mlm_mask` with the options of ``cfg`` (an :class:`MLMConfig`-like)."""
    word_starts = tokenizer.word_starts(tokens) if cfg.whole_word else None
    return mlm_mask(tokens, gen, vocab, mask_prob=cfg.mask_prob, mode=cfg.mode, max_predictions=cfg.max_predictions,
                    whole_word=cfg.whole_word, word_starts=word_starts, mask_token_frac=cfg.mask_token_frac,
                    random_token_frac=cfg.random_token_frac)


class MLMCollator(Collator):
    """``[CLS] block [SEP]``, then 80/10/10 masking of the selected tokens."""

    def __init__(self, cfg: MLMConfig, vocab, tokenizer):
        self.cfg, self.vocab, self.tokenizer = cfg, vocab, tokenizer

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        tokens = frame(blocks, self.vocab.cls_id, self.vocab.sep_id)
        out = apply_mlm(tokens, gen, self.cfg, self.vocab, self.tokenizer)
        out["token_type_ids"] = torch.zeros_like(tokens)
        if self.cfg.document_mask:
            # [CLS] joins the first document, [SEP] the last
            docs = document_ids_from_separators(blocks, self.tokenizer.eos_id)
            out["document_ids"] = torch.cat([docs[:, :1], docs, docs[:, -1:]], dim=1)
        return out


def masked_lm_nll(objective: Objective, model, hidden: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """LM-head cross-entropy at the selected positions only (the head runs on those rows alone)."""
    selected = labels != IGNORE_INDEX
    return objective.lm_nll(model.logits(hidden[selected]), labels[selected])


class MLM(Objective):
    """BERT's masked LM: predict the selected tokens of ``[CLS] block [SEP]`` (blocks of seq_len − 2)."""

    kinds = ("encoder",)
    needs = frozenset({"token_type_ids"})  # all zeros; document_ids too with document_mask=true

    def __init__(self, cfg: MLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.vocab = noise_vocab(tokenizer)
        self.tokenizer = tokenizer

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if seq_len < 3:
            raise too_short(self.cfg.name, seq_len, 3, "[CLS], one token, [SEP]")
        return seq_len - 2, seq_len - 2

    def make_collator(self) -> Collator:
        return MLMCollator(self.cfg, self.vocab, self.tokenizer)

    def attach(self, model) -> None:
        # The [CLS] pooler (BERT/ALBERT) gets no gradient from a token-level loss: freeze it, so
        # that DDP (find_unused_parameters=false) and the optimizer leave it alone. Or build the
        # model with model.pooler=false.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            pooler.requires_grad_(False)

    def encode(self, model, batch) -> torch.Tensor:
        return model(batch["input_ids"], padding_mask=mask_or_none(batch.get("padding_mask")),
                     token_type_ids=batch.get("token_type_ids"), **document_kwargs(batch))

    def loss(self, model, batch) -> LossOutput:
        return masked_lm_nll(self, model, self.encode(model, batch), batch["labels"])
