"""Bidirectional language modelling (ELMo): a forward and a backward LM over the same windows.

Windows of ``seq_len + 1`` tokens with stride ``seq_len``, as causal LM; the model reads the
whole window. The forward LM predicts token t+1 from the forward states up to t, the backward
LM predicts token t-1 from the backward states from t on (``model.bilm_states``), both through
the one shared softmax. So each direction scores ``seq_len`` tokens of each window, and each
token of the stream is scored once by each direction.

Loss: ELMo maximises the sum of the two log-likelihoods; lmkit's ``loss_sum`` is forward NLL +
backward NLL summed over both directions' predictions, divided (as every objective's) by the
number of predictions, here 2 per scored token. So ``train/loss`` and ``val/loss`` are the mean
of the two directions' per-token NLL (half the paper's per-token sum; same gradient direction),
``val/ppl`` = exp of that mean, and ``val/bpb`` the mean of the two directions' bits per byte.
Each direction's own mean NLL is logged as ``train/fwd_nll``, ``train/bwd_nll`` (and ``val/``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.objectives._common import mask_or_none
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective, check_chunked_ce


@dataclass
class BiLMConfig:
    """Options of ``bilm``.

    ``chunked_ce``: compute the shared softmax and the loss ``chunked_ce`` tokens at a time
    without materializing the [tokens, vocabulary] logits (same values). 0 = plain path.
    """

    name: str = "bilm"
    chunked_ce: int = 0

    def __post_init__(self):
        check_chunked_ce(self.chunked_ce)


class BiLMCollator(Collator):
    """The whole window as input; ``fwd_labels`` = tokens 1.., ``bwd_labels`` = tokens ..T-2."""

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"input_ids": blocks, "fwd_labels": blocks[:, 1:], "bwd_labels": blocks[:, :-1]}


def direction_labels(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``fwd_labels``/``bwd_labels`` with -100 where the predicting or the predicted token is padding."""
    fwd, bwd = batch["fwd_labels"], batch["bwd_labels"]
    mask = batch.get("padding_mask")
    if mask is None:
        return fwd, bwd
    both = mask[:, :-1] & mask[:, 1:]  # positions t and t+1 both real
    return fwd.masked_fill(~both, IGNORE_INDEX), bwd.masked_fill(~both, IGNORE_INDEX)


class BiLM(Objective):
    """Forward + backward next-token cross-entropy through a shared softmax (see the module doc)."""

    kinds = ("encoder",)
    needs = frozenset({"bilm_states"})
    scores_every_byte = True  # each direction scores every token of the stream once

    def __init__(self, cfg: BiLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.tokenizer = tokenizer

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        return seq_len + 1, seq_len

    def make_collator(self) -> Collator:
        return BiLMCollator()

    def attach(self, model) -> None:
        # the char CNN reads the run's tokenizer's tokens; ELMo's scalar mix is the downstream task's and
        # gets no gradient here: frozen, so that DDP and the optimizer leave it alone
        set_chars = getattr(model, "set_token_chars", None)
        if callable(set_chars):
            set_chars(self.tokenizer)
        for p in getattr(model, "mix_parameters", list)():
            p.requires_grad_(False)

    def count_targets(self, batch) -> torch.Tensor:
        fwd, bwd = direction_labels(batch)
        return (fwd != IGNORE_INDEX).sum() + (bwd != IGNORE_INDEX).sum()

    def loss(self, model, batch) -> LossOutput:
        fwd_labels, bwd_labels = direction_labels(batch)
        fwd, bwd = model.bilm_states(batch["input_ids"], padding_mask=mask_or_none(batch.get("padding_mask")))
        f = self.lm_head_nll(model, fwd[:, :-1], fwd_labels, self.cfg.chunked_ce)  # state t -> token t+1
        b = self.lm_head_nll(model, bwd[:, 1:], bwd_labels, self.cfg.chunked_ce)  # state t -> token t-1
        nll_sum = f.nll_sum + b.nll_sum
        logs = {"fwd_nll": (f.nll_sum / f.n_targets.clamp(min=1)).detach(),
                "bwd_nll": (b.nll_sum / b.n_targets.clamp(min=1)).detach()}
        return LossOutput(loss_sum=nll_sum, n_targets=f.n_targets + b.n_targets, nll_sum=nll_sum,
                          n_bytes=f.n_bytes + b.n_bytes, logs=logs)
