"""Permutation language modelling (XLNet): predict ≈1/K of each block, last in a random factorization order.

Blocks of ``seq_len`` consecutive tokens of the packed stream (documents separated by EOS; no
``[CLS]``/``[SEP]`` framing, no ``[MASK]`` in the inputs). :func:`lmkit.noise.plm.plm_noise`
chooses n-gram targets and a factorization order; the architecture's two-stream attention
(``two_stream`` capability: :meth:`lmkit.models.xlnet.XLNet.two_stream`) predicts every target
from its query stream, which sees the content of the tokens before it in the order and its own
position, never its own token. Loss: cross-entropy at the targets.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmkit.config.checks import check_finite, check_int
from lmkit.errors import ConfigError
from lmkit.noise.plm import plm_goal, plm_noise
from lmkit.objectives._common import mask_or_none, noise_vocab, too_short
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective


@dataclass
class PLMConfig:
    """Options of ``plm``. Defaults: XLNet (``num_predict`` 85 of ``seq_len`` 512, ``max_gram`` 5,
    ``mask_alpha`` 6 / ``mask_beta`` 1).

    ``k``: predict round(seq_len / k) tokens per block (XLNet's partial prediction, K = 6);
    ``max_gram``: longest n-gram target span; ``alpha``: context tokens per target token around
    each span (``mask_alpha / mask_beta``).
    """

    name: str = "plm"
    k: float = 6.0
    max_gram: int = 5
    alpha: int = 6

    def __post_init__(self):
        check_finite("objective.k", self.k)
        if not self.k > 1:
            raise ConfigError(f"objective.k must be > 1 (predict 1/k of each block's tokens; XLNet uses 6), got {self.k}")
        check_int("objective.max_gram", self.max_gram, minimum=1, hint=" (the longest n-gram target, XLNet: 5)")
        check_int("objective.alpha", self.alpha, minimum=0, hint=" (context tokens per target token, XLNet: 6)")


class PLMCollator(Collator):
    """Blocks -> ``input_ids``, ``labels``, ``target_mask``, ``perm_ranks`` (see :func:`plm_noise`)."""

    def __init__(self, cfg: PLMConfig, vocab):
        self.cfg, self.vocab = cfg, vocab

    def __call__(self, blocks, gen):
        return plm_noise(blocks, gen, self.vocab, self.cfg.k, self.cfg.max_gram, self.cfg.alpha)


class PLM(Objective):
    """XLNet's permutation LM over blocks of ``seq_len`` tokens (stride ``seq_len``)."""

    kinds = ("encoder",)
    needs = frozenset({"two_stream"})

    def __init__(self, cfg: PLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.vocab = noise_vocab(tokenizer)

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if seq_len < 2 or plm_goal(seq_len, self.cfg.k) >= seq_len:
            raise too_short(self.cfg.name, seq_len, 2, "one target and one token of context")
        return seq_len, seq_len

    def make_collator(self) -> Collator:
        return PLMCollator(self.cfg, self.vocab)

    def loss(self, model, batch) -> LossOutput:
        g = model.two_stream(batch["input_ids"], batch["perm_ranks"], batch["target_mask"],
                             padding_mask=mask_or_none(batch.get("padding_mask")))
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        return self.lm_nll(model.logits(g[selected]), labels[selected])
