"""The objective contract: example construction, heads, loss and metrics of one training task."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.tokenizers.base import Tokenizer

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What an objective's loss returns for one micro-batch.

    ``loss_sum``: the objective's loss summed over its ``n_targets`` predictions (the
    module divides by the targets of the whole accumulated step, so gradient accumulation
    is exact). ``nll_sum``/``n_bytes``: language-model negative log-likelihood in nats and
    the UTF-8 bytes its targets stand for, for perplexity and bits-per-byte (None when the
    objective has no LM likelihood). ``logs``: extra scalar metrics (means).
    """

    loss_sum: torch.Tensor
    n_targets: torch.Tensor
    nll_sum: torch.Tensor | None = None
    n_bytes: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Collator:
    """Turns a micro-batch of token blocks into model inputs; runs in DataLoader workers.

    Must be picklable and must not hold model parameters. ``gen`` is seeded from the
    examples' stream positions, so noise is deterministic under resume and multiple workers.
    """

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Objective(nn.Module):
    """Base class of training objectives.

    Subclasses set ``kinds`` (architecture kinds they train) and ``needs`` (the optional
    architecture inputs they pass, see :meth:`needs_for`), and implement
    :meth:`block_layout`, :meth:`make_collator`, :meth:`attach` (build heads that depend on
    the model) and :meth:`loss`. Heads are sub-modules of the objective, so they are
    trained, checkpointed and sharded with the model.
    """

    kinds: tuple[str, ...] = ()
    #: optional architecture inputs (:data:`lmkit.models.base.CAPABILITIES`) this objective
    #: always passes; options that add more are handled by :meth:`needs_for`
    needs: frozenset[str] = frozenset()
    #: sentinel tokens this objective needs at the top of the vocabulary
    required_sentinels: int = 0
    #: True when the LM targets are every token of the text in order (causal LM): only then is
    #: Σ NLL / (bytes · ln 2) a compression rate comparable across tokenizers, and reported as
    #: ``val/bpb``. Objectives that score a sample of the tokens (masked spans, a suffix) do not.
    scores_every_byte: bool = False

    @classmethod
    def needs_for(cls, cfg, kind: str | None) -> frozenset[str]:
        """The capabilities an architecture of ``kind`` must have to train under the validated ``cfg``.

        Checked at compose time, before anything is built (the registration copies this
        method into ``Component.meta["needs"]``). The default: ``needs``, plus
        ``document_ids`` when ``cfg.document_mask`` is true. Override it when the inputs
        depend on other options or on the architecture kind (prefix LM passes an attention
        mask to a decoder, decoder inputs to an encoder–decoder).
        """
        needs = set(cls.needs)
        if getattr(cfg, "document_mask", False):
            needs.add("document_ids")
        return frozenset(needs)

    def __init__(self, cfg, tokenizer: Tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = tokenizer.vocab_size
        self.register_buffer("byte_lengths", torch.from_numpy(np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)), persistent=False)

    def block_layout(self, seq_len: int) -> tuple[int, int]:
        """(block length, stride) of the raw token windows cut from the packed stream."""
        return seq_len, seq_len

    def make_collator(self) -> Collator:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Create heads sized for ``model``; called once before training."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def count_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted tokens in ``batch`` (used to normalise the loss of a whole step)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    # -- shared helpers -------------------------------------------------------------
    def lm_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Summed token cross-entropy (nats) of ``logits`` against ``labels`` (-100 ignored)."""
        flat = labels.reshape(-1)
        nll_sum = nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return self._lm_output(nll_sum, flat)

    def lm_head_nll(self, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 0) -> LossOutput:
        """:meth:`lm_nll` of ``model.logits(hidden)``; fused over row chunks when ``chunk_size`` > 0.

        The fused path (:func:`lmkit.objectives.linear_cross_entropy.linear_cross_entropy`)
        never materializes the whole logits; it needs an architecture whose ``logits`` is
        ``head_input(hidden) @ output_embedding().T`` (declared by ``logits_are_linear =
        True``; ``head_input`` is optional, identity when absent).
        """
        if chunk_size <= 0:
            return self.lm_nll(model.logits(hidden), labels)
        if not getattr(model, "logits_are_linear", False):
            raise ConfigError(f"objective.chunked_ce needs an architecture whose LM head is a plain linear map "
                              f"(logits_are_linear); {type(model).__name__} has another head. Set objective.chunked_ce=0.")
        from lmkit.objectives.linear_cross_entropy import linear_cross_entropy

        head_input = getattr(model, "head_input", None)
        h = head_input(hidden) if head_input is not None else hidden
        nll_sum = linear_cross_entropy(h, model.output_embedding(), labels, chunk_size)
        return self._lm_output(nll_sum, labels.reshape(-1))

    def _lm_output(self, nll_sum: torch.Tensor, flat_labels: torch.Tensor) -> LossOutput:
        valid = flat_labels != IGNORE_INDEX
        n_bytes = self.byte_lengths[flat_labels.clamp(min=0)][valid].sum()
        return LossOutput(loss_sum=nll_sum, n_targets=valid.sum(), nll_sum=nll_sum, n_bytes=n_bytes)


def objective_needs(component, cfg, kind: str | None) -> frozenset[str]:
    """What a registered objective needs of an architecture of ``kind`` under its validated ``cfg``.

    ``component.meta["needs"]``: a collection of capability names, or a callable
    ``(cfg, kind) -> collection``. Without it, an :class:`Objective` subclass factory answers
    with :meth:`Objective.needs_for`; any other factory needs nothing (not checked).
    """
    needs = component.meta.get("needs")
    factory = component.factory
    if needs is None and isinstance(factory, type) and issubclass(factory, Objective):
        needs = factory.needs_for
    if needs is None:
        return frozenset()
    return frozenset(needs(cfg, kind) if callable(needs) else needs)


def document_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"document_ids": ...}`` when the collator made them (``document_mask=true``), else ``{}``.

    Passed to the model only when present, so architectures without document masking keep
    working with every objective that leaves the option off.
    """
    ids = batch.get("document_ids")
    return {} if ids is None else {"document_ids": ids}


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """Σ NLL (nats) / (bytes · ln 2), as in lm-evaluation-harness."""
    return nll_sum / (max(n_bytes, 1) * math.log(2))


def check_chunked_ce(value) -> None:
    """``objective.chunked_ce``: 0 (plain logits) or a positive chunk size in tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"objective.chunked_ce must be >= 0 (0 = plain logits), got {value!r}")
