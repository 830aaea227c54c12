"""SpanBERT: whole-word geometric span masking, MLM + Span Boundary Objective, no NSP.

Reference: facebookresearch/SpanBERT (``pretraining/fairseq/data/masking.py`` for the masks,
``pretraining/fairseq/models/pair_bert.py`` for the SBO head). Each example is
``[CLS] block [SEP]`` (blocks of ``seq_len − 2`` tokens), masked by
:func:`lmkit.noise.spanbert_mask` (see its docstring for where the vectorized sampler
differs from the reference's loop).

SBO: every masked token x_i of a span (s..e) is predicted from
``[h_{s−1}; h_{e+1}; p_{i−s}]`` (boundary hidden states and a learned embedding of the
position inside the span) through Linear → GELU → LayerNorm → Linear → GELU → LayerNorm,
then the tied output embedding (``model.output_embedding()``) plus an SBO output bias.
The second Linear maps to the output embedding's width, so ALBERT (width E) works too.
Tokens of a span that touches the row's edge have no boundary and count for MLM only.
Positions inside a span past ``sbo_max_positions − 1`` share the last embedding.

Loss = MLM + SBO: both summed over their tokens and divided by the number of MLM targets
(SpanBERT's criterion sums the two token losses over one sample size). ``val/ppl`` and
``val/bpb`` are the MLM part's. Logged: ``mlm_loss``, ``sbo_loss`` (per-token means).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.noise import spanbert_mask
from lmkit.objectives._common import check_fracs, check_open_unit, frame, too_short
from lmkit.objectives.base import Collator, LossOutput
from lmkit.objectives.mlm import MLM, masked_lm_nll


@dataclass
class SpanBERTConfig:
    """Options of ``span_bert``. Defaults: SpanBERT (budget ceil(0.15·n), Geometric(0.2) ≤ 10 words)."""

    name: str = "span_bert"
    mask_prob: float = 0.15
    geometric_p: float = 0.2
    max_span_words: int = 10
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1
    sbo_weight: float = 1.0
    sbo_max_positions: int = 128

    def __post_init__(self):
        check_open_unit("mask_prob", self.mask_prob, " (the share of tokens to mask, e.g. 0.15)")
        check_open_unit("geometric_p", self.geometric_p, " (span lengths ~ Geometric(p), e.g. 0.2)")
        if self.max_span_words < 1:
            raise ConfigError(f"objective.max_span_words must be >= 1 (span length < 1 is no span), "
                              f"got {self.max_span_words}")
        check_fracs(self.mask_token_frac, self.random_token_frac)
        if not 0 <= self.sbo_weight < float("inf"):
            raise ConfigError(f"objective.sbo_weight must be a finite number >= 0, got {self.sbo_weight}")
        if self.sbo_max_positions < 1:
            raise ConfigError(f"objective.sbo_max_positions must be >= 1, got {self.sbo_max_positions}")


class SpanBERTCollator(Collator):
    def __init__(self, cfg: SpanBERTConfig, vocab, tokenizer):
        self.cfg, self.vocab, self.tokenizer = cfg, vocab, tokenizer

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        tokens = frame(blocks, self.vocab.cls_id, self.vocab.sep_id)
        out = spanbert_mask(tokens, gen, self.vocab, self.tokenizer.word_starts(tokens), mask_prob=cfg.mask_prob,
                            geometric_p=cfg.geometric_p, max_span_words=cfg.max_span_words,
                            mask_token_frac=cfg.mask_token_frac, random_token_frac=cfg.random_token_frac)
        out["token_type_ids"] = torch.zeros_like(tokens)
        return out


class SBOHead(nn.Module):
    """SpanBERT's pair-target prediction head, up to the tied output projection."""

    def __init__(self, d_model: int, d_out: int, max_positions: int, eps: float = 1e-12):
        super().__init__()
        self.position = nn.Embedding(max_positions, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(3 * d_model, d_model), nn.GELU(), nn.LayerNorm(d_model, eps=eps),
            nn.Linear(d_model, d_out), nn.GELU(), nn.LayerNorm(d_out, eps=eps),
        )
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, left: torch.Tensor, right: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        pos = pos.clamp(max=self.position.num_embeddings - 1)
        return self.mlp(torch.cat([left, right, self.position(pos)], dim=-1))


class SpanBERT(MLM):
    """MLM + SBO on ``[CLS] block [SEP]``."""

    kinds = ("encoder",)
    needs = frozenset({"token_type_ids"})  # all zeros (one segment)

    def __init__(self, cfg: SpanBERTConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.sbo: SBOHead | None = None
        self.sbo_bias = nn.Parameter(torch.zeros(tokenizer.vocab_size))

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if seq_len < 5:
            raise too_short(self.cfg.name, seq_len, 5, "[CLS], a masked span with a token on each side, [SEP]")
        return seq_len - 2, seq_len - 2

    def make_collator(self) -> Collator:
        return SpanBERTCollator(self.cfg, self.vocab, self.tokenizer)

    def attach(self, model) -> None:
        super().attach(model)  # freezes the unused [CLS] pooler
        if self.sbo is None:
            width = model.output_embedding().shape[1]
            self.sbo = SBOHead(model.d_model, width, self.cfg.sbo_max_positions)
            if model.output_embedding().shape[0] != self.sbo_bias.numel():
                self.sbo_bias = nn.Parameter(torch.zeros(model.output_embedding().shape[0]))

    def loss(self, model, batch) -> LossOutput:
        hidden = self.encode(model, batch)
        out = masked_lm_nll(self, model, hidden, batch["labels"])
        left = batch["span_left"]
        rows, cols = (left >= 0).nonzero(as_tuple=True)
        x = self.sbo(hidden[rows, left[rows, cols]], hidden[rows, batch["span_right"][rows, cols]],
                     batch["span_pos"][rows, cols])
        logits = x @ model.output_embedding().t() + self.sbo_bias
        sbo_sum = nn.functional.cross_entropy(logits.float(), batch["labels"][rows, cols], reduction="sum")
        n_sbo = rows.numel()
        mlm_loss = out.loss_sum.detach() / out.n_targets.clamp(min=1)
        out.loss_sum = out.loss_sum + self.cfg.sbo_weight * sbo_sum
        out.logs = {"mlm_loss": mlm_loss, "sbo_loss": sbo_sum.detach() / max(n_sbo, 1)}
        return out
