"""Sequence classification and regression of single sentences or pairs (GLUE-style fine-tuning).

One example per record (:mod:`lmkit.data.examples`), padded per micro-batch, truncated to
``data.seq_len`` (longest text first). The head depends on the architecture's kind:

* encoder (BERT, ALBERT): ``[CLS] A [SEP] B [SEP]`` with segment ids 0/1; a linear layer on the
  ``pooled()`` [CLS] representation (BERT's pooler), after dropout ``head_dropout``.
* decoder (GPT, Llama): ``A [SEP] B <eos>``; a linear layer on the hidden state of the last
  non-pad token (the ``<eos>``: under causal attention the only one that has read everything).
* encoder–decoder (T5, BART): T5's text-to-text form. The encoder reads ``A [SEP] B <eos>``,
  the decoder is trained on the label's name followed by ``<eos>``; a prediction is the class
  whose label string (with ``<eos>``) has the highest log-likelihood under the model.

Classification loss: cross-entropy per example (``val/loss`` is its mean; the enc–dec form's is
per target token). Regression (``num_labels=1`` or ``regression=true``, STS-B style, encoders and
decoders): one output, mean squared error. Validation logs ``val/acc``, ``val/f1`` (macro) and
``val/mcc``, or ``val/mse``, ``val/pearson`` and ``val/spearman``, computed by torchmetrics over
the whole validation split (not averaged per batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.objectives._common import check_special_name, check_unit, mask_or_none, shift_right
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput, Objective

KINDS = ("encoder", "decoder", "encoder_decoder")


@dataclass
class ClassificationConfig:
    """Options of ``classification``. Records come from ``data.path`` (jsonl/csv/tsv; the built-in
    speaker task when unset); the last ``data.val_fraction`` of them is the validation split."""

    name: str = "classification"
    text_field: str = "text"
    text_pair_field: str = "text_pair"  # optional in each record: present = a sentence pair
    label_field: str = "label"
    labels: list[str] | None = None  # the classes in order; null = the training split's labels, sorted
    num_labels: int | None = None  # null = len(labels); 1 = regression
    regression: bool = False  # a float label, MSE loss, Pearson/Spearman (STS-B)
    head_dropout: float = 0.1  # dropout before the classifier (BERT: 0.1)
    decoder_start_token: str = "<pad>"  # encoder–decoders (T5 starts with <pad>; BART with <eos>)

    def __post_init__(self):
        for key in ("text_field", "text_pair_field", "label_field"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"objective.{key} must name a field (jsonl key or csv column), got {getattr(self, key)!r}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ConfigError(f"objective.num_labels must be >= 1 (1 = regression) or null, got {self.num_labels}")
        if self.num_labels == 1:
            self.regression = True
        if self.regression and self.labels:
            raise ConfigError("objective.labels lists classes, but objective.regression=true (or num_labels=1) predicts "
                              "a number: drop one of them")
        if self.regression and self.num_labels not in (None, 1):
            raise ConfigError(f"objective.regression=true predicts one number, but objective.num_labels={self.num_labels}")
        if self.labels is not None and self.num_labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"objective.labels lists {len(self.labels)} classes but objective.num_labels={self.num_labels}")
        if self.labels is not None and len(self.labels) < 2:
            raise ConfigError(f"objective.labels needs at least 2 classes, got {list(self.labels)}")
        check_unit("head_dropout", self.head_dropout, below_one=True)
        check_special_name("decoder_start_token", self.decoder_start_token)


def truncate_pair(a, b, budget: int):
    """Trim the longer text one token at a time until both fit in ``budget`` tokens (HF's longest_first)."""
    if b is None:
        return a[:max(budget, 0)], None
    la, lb = len(a), len(b)
    over = max(la + lb - budget, 0)
    for _ in range(over):
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


class ClassificationCollator(Collator):
    """Frames each example for ``kind``, truncates to ``seq_len`` and pads the micro-batch on the right."""

    def __init__(self, kind: str, seq_len: int, ids: dict[str, int], label_sequences: list[list[int]] | None,
                 regression: bool):
        self.kind, self.seq_len, self.ids = kind, seq_len, ids
        self.label_sequences, self.regression = label_sequences, regression

    def frame(self, a, b) -> tuple[list[int], list[int]]:
        """(token ids, segment ids) of one example (``a``, ``b``: token ids; ``b`` None for one sentence)."""
        ids, single = self.ids, b is None
        if self.kind == "encoder":  # [CLS] A [SEP] (B [SEP])
            a, b = truncate_pair(a, b, self.seq_len - (2 if single else 3))
            first = [ids["cls"], *map(int, a), ids["sep"]]
            second = [] if single else [*map(int, b), ids["sep"]]
            return first + second, [0] * len(first) + [1] * len(second)
        # decoders, and the encoder input of encoder–decoders: A ([SEP] B) <eos>
        a, b = truncate_pair(a, b, self.seq_len - (1 if single else 2))
        tokens = [*map(int, a), *([] if single else [ids["sep"], *map(int, b)]), ids["eos"]]
        return tokens, [0] * len(tokens)

    def __call__(self, examples, gen: torch.Generator) -> dict[str, torch.Tensor]:
        framed = [self.frame(a, b) for a, b, _ in examples]
        T = max(len(t) for t, _ in framed)
        B = len(framed)
        input_ids = torch.full((B, T), self.ids["pad"], dtype=torch.long)
        types = torch.zeros((B, T), dtype=torch.long)
        for r, (tokens, segs) in enumerate(framed):
            input_ids[r, :len(tokens)] = torch.tensor(tokens)
            types[r, :len(segs)] = torch.tensor(segs)
        lengths = torch.tensor([len(t) for t, _ in framed])
        out = {"input_ids": input_ids, "padding_mask": torch.arange(T)[None, :] < lengths[:, None]}
        targets = [y for _, _, y in examples]
        out["class_labels"] = torch.tensor(targets, dtype=torch.float32 if self.regression else torch.long)
        if self.kind == "encoder":
            out["token_type_ids"] = types
        if self.kind == "encoder_decoder":
            seqs = [self.label_sequences[y] for y in targets]
            L = max(len(s) for s in seqs)
            labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
            for r, s in enumerate(seqs):
                labels[r, :len(s)] = torch.tensor(s)
            out["labels"] = labels
            out["decoder_input_ids"] = shift_right(labels, self.ids["start"], self.ids["pad"])
            out["decoder_padding_mask"] = labels != IGNORE_INDEX
        return out


def last_token_hidden(hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of each row's last real token (right padding): [B, T, D] -> [B, D]."""
    if padding_mask is None:
        return hidden[:, -1]
    last = padding_mask.long().sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Classification(Objective):
    """A sequence-level head (encoders, decoders) or label-as-text (encoder–decoders); see the module doc."""

    kinds = KINDS
    #: one example per record: the run builds this objective's datamodule (:meth:`make_datamodule`)
    #: before the model, because the classes found in the data size the head
    example_based = True

    @classmethod
    def needs_for(cls, cfg, kind: str | None) -> frozenset[str]:
        if kind == "encoder":
            return frozenset({"pooled", "token_type_ids"})
        if kind == "encoder_decoder":
            return frozenset({"decoder_input_ids"})
        return frozenset()

    def __init__(self, cfg: ClassificationConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.tokenizer = tokenizer
        self.kind: str | None = None
        self.seq_len: int | None = None
        self.labels: list[str] | None = None
        self.label_sequences: list[list[int]] | None = None
        self.head: nn.Module | None = None
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.metrics = nn.ModuleDict()

    # -- data ---------------------------------------------------------------------------
    def make_datamodule(self, run, source, tokenizer, cache_dir, data_steps):
        """The example datamodule of ``run``, prepared (so the classes are known); records them in the run's config."""
        from omegaconf import open_dict

        from lmkit.data.examples import ExampleDataModule, RecordFields, example_files

        self.kind = run.model_component.meta.get("kind") or getattr(run.model_component.factory, "kind", None)
        self.seq_len = run.data.seq_len
        cfg = self.cfg
        if cfg.regression and self.kind == "encoder_decoder":
            raise ConfigError("objective.regression needs an encoder or decoder head; encoder–decoders predict label "
                              "text (T5 rounds STS-B scores to classes: list them in objective.labels=[...])")
        fields = RecordFields(cfg.text_field, cfg.text_pair_field, cfg.label_field)
        dm = ExampleDataModule(run.data, example_files(run.data, cache_dir), fields, tokenizer, self, run.seed,
                               cache_dir, run.trainer.val_batches, labels=cfg.labels, regression=cfg.regression,
                               data_steps=data_steps)
        dm.prepare()
        if dm.labels is not None and cfg.num_labels is not None and len(dm.labels) != cfg.num_labels:
            raise ConfigError(f"objective.num_labels={cfg.num_labels}, but the training split has {len(dm.labels)} "
                              f"labels ({', '.join(dm.labels)}); list the classes in objective.labels=[...]")
        if dm.labels is not None:  # the run's config.yaml keeps the mapping (class i = labels[i])
            with open_dict(run.raw):
                run.raw.objective.labels = list(dm.labels)
        return dm

    def set_labels(self, labels: list[str] | None) -> None:
        """The classes, in order (None: regression); called by the datamodule before :meth:`attach`."""
        if self.head is not None and labels != self.labels:
            raise ConfigError(f"the classes changed after the head was built: {self.labels} -> {labels}")
        self.labels = None if labels is None else list(labels)
        if self.labels is not None:
            tok = self.tokenizer
            self.label_sequences = [list(tok.encode(name)) + [tok.eos_id] for name in self.labels]

    def make_collator(self) -> Collator:
        tok = self.tokenizer
        ids = {"pad": tok.pad_id, "eos": tok.eos_id, "cls": tok.cls_id, "sep": tok.sep_id,
               "start": tok.special_id(self.cfg.decoder_start_token)}
        return ClassificationCollator(self.kind, self.seq_len, ids, self.label_sequences, self.cfg.regression)

    # -- heads and metrics -------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return 1 if self.cfg.regression else len(self.labels)

    def attach(self, model) -> None:
        self.kind = model.kind
        if self.labels is None and not self.cfg.regression:
            raise ConfigError("objective 'classification' has no classes: its data must be prepared before the model "
                              "(make_datamodule), or objective.labels given")
        if self.kind == "encoder" and not callable(getattr(model, "pooled", None)):
            raise ConfigError(f"objective 'classification' on an encoder reads its pooled() [CLS] representation; "
                              f"{type(model).__name__} has none (BERT: model.pooler=true)")
        if self.kind != "encoder_decoder" and self.head is None:
            self.head = nn.Linear(model.d_model, self.num_outputs)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        if not self.metrics:
            self.metrics = build_metrics(self.cfg.regression, None if self.cfg.regression else len(self.labels))

    def count_targets(self, batch) -> torch.Tensor:
        if self.kind == "encoder_decoder":
            return (batch["labels"] != IGNORE_INDEX).sum()
        return torch.tensor(batch["class_labels"].shape[0], device=batch["class_labels"].device)

    def features(self, model, batch) -> torch.Tensor:
        """The sequence representation the head reads: pooled [CLS] (encoders) or the last real token (decoders)."""
        mask = mask_or_none(batch["padding_mask"])
        if self.kind == "encoder":
            hidden = model(batch["input_ids"], padding_mask=mask, token_type_ids=batch["token_type_ids"])
            return model.pooled(hidden)
        hidden = model(batch["input_ids"], padding_mask=mask)
        return last_token_hidden(hidden, batch["padding_mask"])

    def forward_logits(self, model, batch) -> torch.Tensor:
        """Head outputs [B, classes] (or [B] for regression)."""
        out = self.head(self.dropout(self.features(model, batch))).float()
        return out[:, 0] if self.cfg.regression else out

    def label_log_likelihoods(self, model, batch) -> torch.Tensor:
        """Encoder–decoders: log p(label string + <eos> | input) of every class, [B, classes]."""
        B = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        scores = []
        for seq in self.label_sequences:
            target = torch.tensor(seq, device=device)[None, :].expand(B, -1)
            dec = shift_right(target, self.tokenizer.special_id(self.cfg.decoder_start_token), self.tokenizer.pad_id)
            hidden = model(batch["input_ids"], padding_mask=mask_or_none(batch["padding_mask"]), decoder_input_ids=dec)
            logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)
            scores.append(logp.gather(-1, target[..., None])[..., 0].sum(-1))
        return torch.stack(scores, dim=1)

    def loss(self, model, batch) -> LossOutput:
        y = batch["class_labels"]
        if self.kind == "encoder_decoder":
            hidden = model(batch["input_ids"], padding_mask=mask_or_none(batch["padding_mask"]),
                           decoder_input_ids=batch["decoder_input_ids"],
                           decoder_padding_mask=mask_or_none(batch["decoder_padding_mask"]))
            out = self.lm_nll(model.logits(hidden), batch["labels"])
            out.nll_sum = out.n_bytes = out.loss_sum.new_zeros(())  # label text, not LM: no perplexity
            if not self.training:
                with torch.no_grad():
                    out.logs = self.update_metrics(self.label_log_likelihoods(model, batch).argmax(-1), y)
            return out
        logits = self.forward_logits(model, batch)
        if self.cfg.regression:
            loss_sum = nn.functional.mse_loss(logits, y, reduction="sum")
        else:
            loss_sum = nn.functional.cross_entropy(logits, y, reduction="sum")
        n = torch.tensor(y.shape[0], device=y.device)
        if self.training:
            logs = {} if self.cfg.regression else {"acc": (logits.argmax(-1) == y).float().mean().detach()}
        else:
            logs = self.update_metrics(logits.detach(), y)
        zero = loss_sum.new_zeros(())  # no LM likelihood: the module then reports no perplexity
        return LossOutput(loss_sum=loss_sum, n_targets=n, nll_sum=zero, n_bytes=zero, logs=logs)

    def update_metrics(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict:
        """Feed the validation metrics; the returned torchmetrics objects are logged by the module, which
        computes them over the whole validation epoch (``self.log`` of a Metric) and resets them."""
        if not self.cfg.regression and predictions.dim() == 2:
            predictions = predictions.argmax(-1)
        for metric in self.metrics.values():
            metric.update(predictions, targets)
        return dict(self.metrics.items())


def build_metrics(regression: bool, num_classes: int | None) -> nn.ModuleDict:
    """torchmetrics objects: accuracy, macro F1 and MCC of classes, or MSE, Pearson and Spearman of numbers."""
    if regression:
        from torchmetrics.regression import MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

        return nn.ModuleDict({"mse": MeanSquaredError(), "pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

    return nn.ModuleDict({"acc": MulticlassAccuracy(num_classes, average="micro"),
                          "f1": MulticlassF1Score(num_classes, average="macro"),
                          "mcc": MulticlassMatthewsCorrCoef(num_classes)})
