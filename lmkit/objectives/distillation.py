"""Knowledge distillation (DistilBERT, Sanh et al. 2019): a student trained to match a frozen teacher.

Loss per scored position (DistilBERT's ``distiller.py``)::

    α_ce · T² · KL(softmax(t/T) ‖ softmax(s/T))  +  α_cos · (1 − cos(h_s, h_t))  +  α_lm · LM loss

``t``/``s``: teacher/student logits; ``h``: last hidden states. Encoders: the LM loss is
BERT's MLM on the masked tokens (lmkit's MLM collator), the KL and cosine cover every
non-padding position (DistilBERT's default; ``kl_positions=masked`` restricts them to the
masked tokens). Decoders: every next-token position, the LM loss is the causal LM loss.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmkit.errors import ConfigError
from lmkit.objectives._common import mask_or_none, noise_vocab, too_short
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective, document_kwargs
from lmkit.objectives.causal_lm import CausalLMCollator
from lmkit.objectives.mlm import MLMCollator, MLMConfig
from lmkit.objectives.teacher import load_teacher, student_init_state, teacher_layers, teacher_tokenizer

KL_POSITIONS = ("all", "masked")
KINDS = ("encoder", "decoder")


@dataclass
class DistillationConfig(MLMConfig):
    """Options of ``distillation`` (defaults: DistilBERT's recipe; the masking options are ``mlm``'s).

    ``teacher``: an lmkit run directory or checkpoint, or a local Hugging Face model directory.
    ``alpha_lm``: weight of the student's own LM loss (MLM for encoders, causal LM for decoders;
    DistilBERT's α_mlm / α_clm). ``init_from_teacher``: start student layer i from teacher layer
    ``teacher_layers[i]`` (default 2i) and every other tensor from the teacher's; null = when all
    shapes allow it. ``kl_positions``: ``all`` non-padding positions (DistilBERT) or the ``masked`` ones.
    """

    name: str = "distillation"
    teacher: str | None = None
    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_lm: float = 2.0
    alpha_cos: float = 1.0
    kl_positions: str = "all"
    init_from_teacher: bool | None = None
    teacher_layers: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher:
            raise ConfigError("objective.teacher is not set: give the teacher's lmkit run directory or Hugging Face "
                              "model directory (objective.teacher=PATH)")
        if not Path(self.teacher).exists():
            raise ConfigError(f"objective.teacher={self.teacher} does not exist: give an lmkit run directory or "
                              f"checkpoint, or a local Hugging Face model directory")
        if not self.temperature > 0:
            raise ConfigError(f"objective.temperature must be > 0, got {self.temperature}")
        for key in ("alpha_ce", "alpha_lm", "alpha_cos"):
            if getattr(self, key) < 0:
                raise ConfigError(f"objective.{key} must be >= 0, got {getattr(self, key)}")
        if self.alpha_ce == self.alpha_lm == self.alpha_cos == 0:
            raise ConfigError("objective.alpha_ce, alpha_lm and alpha_cos are all 0: nothing to train")
        if self.kl_positions not in KL_POSITIONS:
            raise ConfigError(f"objective.kl_positions must be one of {', '.join(KL_POSITIONS)}, got {self.kl_positions!r}")


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over rows of KL(softmax(t/T) ‖ softmax(s/T)) (nats, float32)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)


def cosine_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Σ over rows of 1 − cos(h_s, h_t) (``CosineEmbeddingLoss`` with target 1, summed)."""
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).sum()


class Distillation(Objective):
    """DistilBERT's triple loss against a frozen teacher of the student's kind (encoder or decoder)."""

    kinds = KINDS

    @classmethod
    def needs_for(cls, cfg, kind):
        needs = set(super().needs_for(cfg, kind))
        if kind == "encoder":
            needs.add("token_type_ids")  # all zeros, as mlm
        return frozenset(needs)

    @staticmethod
    def required_tokenizer(cfg):
        """The run's tokenizer: the teacher's (the student predicts over the teacher's vocabulary)."""
        return teacher_tokenizer(cfg.teacher)

    def __init__(self, cfg: DistillationConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        theirs = teacher_tokenizer(cfg.teacher)
        if theirs.vocab_size != tokenizer.vocab_size or theirs.fingerprint() != tokenizer.fingerprint():
            raise ConfigError(f"objective.teacher={cfg.teacher} was trained with another tokenizer ({theirs.vocab_size} "
                              f"ids, fingerprint {theirs.fingerprint()}) than this run's ({tokenizer.vocab_size} ids, "
                              f"{tokenizer.fingerprint()}): the student must use the teacher's tokenizer (drop init_from, "
                              f"or give a teacher trained with this tokenizer)")
        teacher = load_teacher(cfg.teacher)
        if teacher.kind not in KINDS:
            raise ConfigError(f"objective.teacher={cfg.teacher} is a {teacher.architecture} model ({_a(teacher.kind)}); "
                              f"distillation trains encoders and decoders")
        object.__setattr__(self, "teacher", teacher)  # not a sub-module: never trained, saved or switched to train()
        self.kind = teacher.kind
        self.tokenizer = tokenizer
        self.vocab = noise_vocab(tokenizer) if self.kind == "encoder" else None
        self.lm_name = "mlm" if self.kind == "encoder" else "clm"

    # -- data ------------------------------------------------------------------------------------
    def block_layout(self, seq_len: int) -> tuple[int, int]:
        if self.kind == "decoder":
            return seq_len + 1, seq_len
        if seq_len < 3:
            raise too_short(self.cfg.name, seq_len, 3, "[CLS], one token, [SEP]")
        return seq_len - 2, seq_len - 2

    def make_collator(self) -> Collator:
        if self.kind == "encoder":
            return MLMCollator(self.cfg, self.vocab, self.tokenizer)
        return CausalLMCollator(self.tokenizer.eos_id if self.cfg.document_mask else None)

    # -- model -----------------------------------------------------------------------------------
    def frozen_models(self) -> list[torch.nn.Module]:
        """The teacher: used, never trained (a parallelism plugin shards it as it shards the model)."""
        return [self.teacher]

    def attach(self, model) -> None:
        if model.kind != self.kind:
            raise ConfigError(f"the student is {_a(model.kind)} ({type(model).__name__}) but objective.teacher="
                              f"{self.cfg.teacher} is {_a(self.kind)} ({self.teacher.architecture}): choose a student "
                              f"model of the teacher's kind (e.g. model={self.teacher.architecture}_tiny)")
        s_width, t_width = _width(model), _width(self.teacher.model)
        if self.cfg.alpha_cos > 0 and s_width != t_width:
            raise ConfigError(f"objective.alpha_cos compares hidden states, but the student's width ({s_width}) is not "
                              f"the teacher's ({t_width}): set model.d_model={t_width} or objective.alpha_cos=0")
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):  # no gradient from a token-level loss (as mlm)
            pooler.requires_grad_(False)

    def init_model(self, model) -> None:
        """A fresh student (not resumed, not ``init_from``): every other teacher layer, embeddings and heads."""
        if self.cfg.init_from_teacher is False:
            return
        n_s, n_t = len(model.transformer_blocks()), len(self.teacher.transformer_blocks())
        try:
            layers = teacher_layers(self.cfg.teacher_layers, n_s, n_t)
        except ConfigError:
            if self.cfg.init_from_teacher:
                raise
            _say(f"the student ({n_s} layers) starts fresh: the teacher's {n_t} layers do not give every other layer")
            return
        state, mismatched = student_init_state(model, self.teacher.model, layers)
        if mismatched:
            if self.cfg.init_from_teacher:
                raise ConfigError(f"objective.init_from_teacher=true but the student's shapes differ from the teacher's "
                                  f"({mismatched[0]}" + (f", and {len(mismatched) - 1} more" if len(mismatched) > 1 else "")
                                  + "): give the student the teacher's widths, or set objective.init_from_teacher=false")
            _say(f"the student starts fresh: its shapes differ from the teacher's ({mismatched[0]})")
            return
        with torch.no_grad():
            ours = model.state_dict()
            for name, value in state.items():
                ours[name].copy_(value.to(ours[name].dtype))
        fresh = sorted(set(model.state_dict()) - set(state))
        _say(f"student layers {list(range(n_s))} start from teacher layers {layers}; {len(state)} tensors copied"
             + (f"; fresh: {', '.join(fresh)}" if fresh else ""))

    def _place_teacher(self, model) -> None:
        """The teacher on the student's device, in the student's parameter dtype (once; a sharded one stays put)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.teacher, FSDPModule):
            return
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        have = next(self.teacher.parameters())
        if ref is not None and (have.device != ref.device or have.dtype != ref.dtype):
            self.teacher.to(device=ref.device, dtype=ref.dtype)

    # -- loss ------------------------------------------------------------------------------------
    def _inputs(self, batch) -> dict:
        kw = {"padding_mask": mask_or_none(batch.get("padding_mask")), **document_kwargs(batch)}
        if self.kind == "encoder":
            kw["token_type_ids"] = batch.get("token_type_ids")
        return kw

    def positions(self, batch) -> torch.Tensor:
        """Bool [B, T]: the positions the KL and cosine terms score."""
        labels = batch["labels"]
        if self.kind == "decoder" or self.cfg.kl_positions == "masked":
            return labels != IGNORE_INDEX
        mask = batch.get("padding_mask")
        return torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()

    def count_targets(self, batch) -> torch.Tensor:
        return self.positions(batch).sum()

    def loss(self, model, batch) -> LossOutput:
        self._place_teacher(model)
        cfg, T = self.cfg, float(self.cfg.temperature)
        kw = self._inputs(batch)
        pos = self.positions(batch)
        hidden_s = model(batch["input_ids"], **kw)
        hidden_t, logits_t = self.teacher(batch["input_ids"], pos, **kw)
        if callable(getattr(self.teacher, "reshard", None)):  # FSDP2 keeps a root gathered for a backward it never gets
            self.teacher.reshard()
        V = self.vocab_size  # a padded embedding's extra rows are never targets
        logits_s = model.logits(hidden_s[pos])[..., :V]
        logits_t = logits_t[..., :V]
        n_pos = pos.sum()
        kl = kl_sum(logits_s, logits_t, T)
        cos = cosine_sum(hidden_s[pos], hidden_t[pos]) if cfg.alpha_cos > 0 else kl.new_zeros(())
        labels = batch["labels"][pos]
        lm = self.lm_nll(logits_s, labels)  # ignored labels (unmasked tokens) are skipped
        n_lm = lm.n_targets
        # the LM term is a mean over its own targets; scaled to the scored positions, which normalise the step
        lm_per_pos = lm.loss_sum * (n_pos.float() / n_lm.clamp(min=1).float())
        loss_sum = cfg.alpha_ce * T * T * kl + cfg.alpha_cos * cos + cfg.alpha_lm * lm_per_pos
        denom = n_pos.clamp(min=1).float()
        logs = {"kl": kl.detach() / denom, "cos": cos.detach() / denom,
                self.lm_name: lm.loss_sum.detach() / n_lm.clamp(min=1).float()}
        same_targets = bool(n_lm == n_pos)  # the LM targets are the scored positions: perplexity is comparable
        return LossOutput(loss_sum=loss_sum, n_targets=n_pos, nll_sum=lm.nll_sum if same_targets else None,
                          n_bytes=lm.n_bytes if same_targets else None, logs=logs)


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _width(model) -> int | None:
    return getattr(model, "d_model", None) or getattr(getattr(model, "cfg", None), "d_model", None)


def _say(message: str) -> None:
    print(f"lmkit: distillation: {message}", file=sys.stdout, flush=True)
