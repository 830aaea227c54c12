"""MLM plus a sentence-pair task on the pooled [CLS]: NSP (BERT) and SOP (ALBERT).

Each example is ``[CLS] A [SEP] B [SEP]`` (segment ids 0 for ``[CLS] A [SEP]``, 1 for
``B [SEP]``) built from one block of ``seq_len − 3`` consecutive tokens split at a point
uniform in [1, n−1]: A is the part before it, the true B the part after it.

* NSP: with ``negative_prob`` (0.5) B is replaced by a segment of the same length from
  another block of the micro-batch (a random other row, at a random offset). BERT takes it
  from another *document*; inside a collator only the micro-batch's blocks are at hand, so
  the negative comes from another position of the corpus: training blocks are drawn in a
  random order, so that is almost always a different part of the text, and never the true
  continuation. Needs ``data.batch_size >= 2``. Label 1 = B is not the next segment.
* SOP: with ``negative_prob`` (0.5) the two segments are swapped (``[CLS] B [SEP] A [SEP]``).
  Label 1 = swapped.

Loss = MLM + the sentence-pair cross-entropy, each a mean over its own targets as in BERT;
the pair loss enters the summed loss weighted by the micro-batch's MLM target count, so the
module's normalisation by MLM targets gives ``MLM mean + pair mean``. ``val/ppl`` and
``val/bpb`` are those of the MLM part alone. Logged: ``mlm_loss``, ``{task}_loss``,
``{task}_acc``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.objectives._common import check_mlm_fields, check_unit, require_method, too_short
from lmkit.objectives.base import Collator, LossOutput
from lmkit.objectives.mlm import MLM, apply_mlm, masked_lm_nll

TASKS = ("nsp", "sop")


@dataclass
class NSPConfig:
    """Options of ``nsp`` (BERT). The masking options are those of ``mlm``."""

    name: str = "nsp"
    task: str = "nsp"
    negative_prob: float = 0.5  # share of pairs whose B is a random segment (nsp) / swapped (sop)
    mask_prob: float = 0.15
    mode: str = "exact"
    max_predictions: int | None = None
    whole_word: bool = False
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"objective.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check_unit("negative_prob", self.negative_prob)
        check_mlm_fields(self)


@dataclass
class SOPConfig(NSPConfig):
    """Options of ``sop`` (ALBERT's sentence-order prediction)."""

    name: str = "sop"
    task: str = "sop"


class SentencePairCollator(Collator):
    def __init__(self, cfg, vocab, tokenizer):
        self.cfg, self.vocab, self.tokenizer = cfg, vocab, tokenizer

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        B, n = blocks.shape
        cfg, vocab = self.cfg, self.vocab
        seq_len = n + 3
        u = torch.rand((B, 3), generator=gen, dtype=torch.float64)
        a = 1 + torch.minimum(torch.floor(u[:, 0] * (n - 1)).long(), torch.tensor(n - 2))  # len(A) in [1, n-1]
        negative = u[:, 1] < cfg.negative_prob
        rows = torch.arange(B)
        if cfg.task == "nsp":
            if B < 2 and bool(negative.any()):
                raise ConfigError(
                    "objective 'nsp' draws its random next segments from the other blocks of a micro-batch, "
                    "so it needs data.batch_size >= 2"
                )
            shift = 1 + torch.randint(max(B - 1, 1), (B,), generator=gen)  # another row
            partner = torch.where(negative, (rows + shift) % B, rows)
            offset = torch.floor(u[:, 2] * (a + 1).double()).long()  # B_neg = partner[o : o + n - a], o <= a
            first_start, first_len = torch.zeros_like(a), a
            second_row = partner
            second_start = torch.where(negative, offset, a)
        else:  # sop: swapped order
            first_start = torch.where(negative, a, torch.zeros_like(a))
            first_len = torch.where(negative, n - a, a)
            second_row = rows
            second_start = torch.where(negative, torch.zeros_like(a), a)
        j = torch.arange(seq_len)[None, :]
        fl = first_len[:, None]
        in_first = (j >= 1) & (j <= fl)
        in_second = (j >= fl + 2) & (j <= seq_len - 2)
        src_row = torch.where(in_second, second_row[:, None], rows[:, None])
        src_col = torch.where(in_first, first_start[:, None] + j - 1, second_start[:, None] + j - fl - 2)
        tokens = blocks[src_row, src_col.clamp(0, n - 1)]
        tokens = torch.where(j == 0, vocab.cls_id, tokens)
        tokens = torch.where((j == fl + 1) | (j == seq_len - 1), vocab.sep_id, tokens)
        out = apply_mlm(tokens, gen, cfg, vocab, self.tokenizer)
        out["token_type_ids"] = (j >= fl + 2).long().expand(B, seq_len).contiguous()
        out["pair_labels"] = negative.long()
        return out


class SentencePair(MLM):
    """BERT's MLM + NSP, or ALBERT's MLM + SOP (``cfg.task``); blocks of ``seq_len − 3`` tokens."""

    kinds = ("encoder",)
    needs = frozenset({"token_type_ids", "pooled"})  # segment A/B ids; the [CLS] pooler feeds the pair head

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.pair_head: nn.Module | None = None

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if seq_len < 5:
            raise too_short(self.cfg.name, seq_len, 5, "[CLS] A [SEP] B [SEP] with one token each")
        return seq_len - 3, seq_len - 3

    def make_collator(self) -> Collator:
        return SentencePairCollator(self.cfg, self.vocab, self.tokenizer)

    def attach(self, model) -> None:
        require_method(self.cfg.name, model, "pooled", "the [CLS] pooler the sentence-pair classifier reads")
        if self.pair_head is None:
            self.pair_head = nn.Linear(model.d_model, 2)
            nn.init.normal_(self.pair_head.weight, std=0.02)
            nn.init.zeros_(self.pair_head.bias)

    def loss(self, model, batch) -> LossOutput:
        hidden = self.encode(model, batch)
        out = masked_lm_nll(self, model, hidden, batch["labels"])
        logits = self.pair_head(model.pooled(hidden)).float()
        pair_labels = batch["pair_labels"]
        pair_loss = nn.functional.cross_entropy(logits, pair_labels)
        task = self.cfg.task
        mlm_loss = out.loss_sum.detach() / out.n_targets.clamp(min=1)
        out.loss_sum = out.loss_sum + pair_loss * out.n_targets
        out.logs = {"mlm_loss": mlm_loss, f"{task}_loss": pair_loss.detach(),
                    f"{task}_acc": (logits.argmax(-1) == pair_labels).float().mean()}
        return out
