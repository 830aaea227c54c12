"""Causal language modelling (GPT): predict every next token of packed windows."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.models.layers import document_ids_from_separators
from lmkit.objectives.base import Collator, LossOutput, Objective, check_chunked_ce, document_kwargs


@dataclass
class CausalLMConfig:
    """Options of ``causal_lm``.

    ``document_mask``: tokens attend only to earlier tokens of their own document (documents
    are separated by EOS in the packed stream; the EOS belongs to the document it ends) and
    learned positions restart at each document, as if every document were its own sequence.
    The EOS position still predicts the next document's first token. Off by default (GPT-2
    and GPT-3 attend across document boundaries).

    ``chunked_ce``: compute the LM head and the loss ``chunked_ce`` tokens at a time without
    materializing the [tokens, vocabulary] logits (same values and gradients; far less
    memory at large vocabularies). 0 = plain path.
    """

    name: str = "causal_lm"
    document_mask: bool = False
    chunked_ce: int = 0  # > 0: LM head + cross-entropy fused over chunks of this many tokens

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)


class CausalLMCollator(Collator):
    """``input_ids``/``labels`` shifted by one; ``document_ids`` too when ``eos_id`` is given."""

    def __init__(self, eos_id: int | None = None):
        self.eos_id = eos_id

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}
        if self.eos_id is not None:
            out["document_ids"] = document_ids_from_separators(out["input_ids"], self.eos_id)
        return out


class CausalLM(Objective):
    """Next-token cross-entropy over windows of ``seq_len + 1`` tokens (stride ``seq_len``).

    Documents are packed with EOS between them; every position is a target, so no token
    is wasted on padding.
    """

    kinds = ("decoder",)
    scores_every_byte = True

    def __init__(self, cfg: CausalLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.eos_id = tokenizer.eos_id

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        return seq_len + 1, seq_len

    def make_collator(self) -> Collator:
        return CausalLMCollator(self.eos_id if self.cfg.document_mask else None)

    def loss(self, model, batch) -> LossOutput:
        hidden = model(batch["input_ids"], padding_mask=batch.get("padding_mask"), **document_kwargs(batch))
        return self.lm_head_nll(model, hidden, batch["labels"], self.cfg.chunked_ce)
