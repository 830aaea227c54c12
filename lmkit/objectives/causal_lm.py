"""Causal language modelling (GPT): predict every next token of packed windows."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.objectives.base import Collator, LossOutput, Objective


@dataclass
class CausalLMConfig:
    name: str = "causal_lm"


class CausalLMCollator(Collator):
    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}


class CausalLM(Objective):
    """Next-token cross-entropy over windows of ``seq_len + 1`` tokens (stride ``seq_len``).

    Documents are packed with EOS between them; every position is a target, so no token
    is wasted on padding.
    """

    kinds = ("decoder",)

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        return seq_len + 1, seq_len

    def make_collator(self) -> Collator:
        return CausalLMCollator()

    def loss(self, model, batch) -> LossOutput:
        hidden = model(batch["input_ids"], padding_mask=batch.get("padding_mask"))
        return self.lm_nll(model.logits(hidden), batch["labels"])
