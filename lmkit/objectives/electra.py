"""ELECTRA: replaced token detection with a small MLM generator (Clark et al. 2020).

Reference: google-research/electra (``run_pretraining.py``, ``pretrain/pretrain_helpers.py``,
``configure_pretraining.py``). Each example is ``[CLS] block [SEP]`` masked by the ``mlm``
collator (:class:`lmkit.objectives.mlm.MLMCollator`) with ELECTRA's rates: 15% of the
positions, of which 85% become ``[MASK]`` and 15% stay unchanged (no random tokens).

* **Generator**: an MLM encoder of the discriminator's family, built in :meth:`ELECTRA.attach`
  as a sub-module of the objective (``objective.generator.*``), so it trains, checkpoints and
  shards with the model. Hidden size ``round(generator_size · d_model)`` (ELECTRA's
  ``generator_hidden_size`` 0.25), ``round(generator_layers · n_layer)`` layers, attention
  heads of the discriminator's head width (ELECTRA: ``hidden // 64``), feed-forward scaled
  alike. It shares the discriminator's embedding layer (token, position, segment embeddings
  and their LayerNorm; read from the model, never copied); when the embedding width differs
  from its hidden size it projects them (ELECTRA's ``embeddings_project``). Its MLM head maps
  its hidden size to the embedding width (Linear, GELU, LayerNorm) and uses the shared word
  embedding as the output matrix, plus its own bias. For ALBERT the generator's layers are
  not shared across depth.
* **Sampling**: at every selected position a token is drawn from the generator's softmax
  (``logits / temperature``, Gumbel-max on detached logits: no gradient through sampling),
  with a generator seeded by the collator (``sample_seed``), so a run is reproducible and
  resumes exactly on any device.
* **Discriminator**: the model, run on the original tokens with every selected position
  replaced by its sample. Label 1 ("replaced") only where the sample differs from the
  original; a sample equal to the original is labelled original. Head: Linear(H, H), GELU,
  Linear(H, 1) on every hidden state (ELECTRA's ``_get_discriminator_output``); sigmoid
  binary cross-entropy averaged over all non-pad tokens ([CLS] and [SEP] included).
* **Loss** = generator MLM (mean over the selected tokens) + ``disc_weight`` (λ = 50) ×
  discriminator BCE (mean over non-pad tokens). As with NSP, the discriminator mean enters
  the summed loss weighted by the micro-batch's MLM target count, so the module's
  normalisation by MLM targets gives exactly that sum. ``val/ppl`` is the generator's.

Logged: ``gen_loss``, ``disc_loss``, ``disc_acc`` (threshold 0 on the logit, over non-pad
tokens), ``replaced_frac`` (share of the selected positions whose sample differs from the
original). The discriminator's own MLM head and pooler get no gradient and are frozen; the
exported model is the discriminator (``objective.*`` tensors are left out of the export).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkit.errors import ConfigError
from lmkit.models.bert import MLMHead
from lmkit.models.init import initialize
from lmkit.models.layers import PostLNBlock, apply_documents, build_attention_bias, sum_embeddings
from lmkit.objectives._common import check_mlm_fields, mask_or_none
from lmkit.objectives.base import IGNORE_INDEX, Collator, LossOutput
from lmkit.objectives.mlm import MLM, MLMCollator

#: the discriminator's attributes the generator reads to share its embedding layer
SHARED_EMBEDDING_ATTRS = ("wte", "wpe", "wtte", "ln_emb", "drop", "max_seq_len")


@dataclass
class ELECTRAConfig:
    """Options of ``electra``. Defaults: google-research/electra ``configure_pretraining.py``.

    ``generator_size``: the generator's hidden size as a fraction of the discriminator's
    (ELECTRA 0.25; the paper finds 1/4–1/2 best). ``generator_layers``: its depth as a fraction
    of the discriminator's (1.0). Neither may exceed 1 (a generator larger than the
    discriminator). ``disc_weight``: λ. ``temperature``: of the generator's sampling softmax.
    The masking options are those of ``mlm`` with ELECTRA's 85% [MASK] / 15% unchanged.
    """

    name: str = "electra"
    generator_size: float = 0.25
    generator_layers: float = 1.0
    disc_weight: float = 50.0
    temperature: float = 1.0
    mask_prob: float = 0.15
    mode: str = "exact"
    max_predictions: int | None = None
    whole_word: bool = False
    mask_token_frac: float = 0.85
    random_token_frac: float = 0.0
    document_mask: bool = False

    def __post_init__(self):
        for key in ("generator_size", "generator_layers"):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value <= 1:
                larger = " (a generator larger than the discriminator)" if number and value > 1 else ""
                raise ConfigError(f"objective.{key} must be a fraction of the discriminator's in (0, 1], got {value!r}"
                                  f"{larger}; ELECTRA uses generator_size=0.25, generator_layers=1.0")
        if isinstance(self.disc_weight, bool) or not 0 <= self.disc_weight < float("inf"):
            raise ConfigError(f"objective.disc_weight must be a finite number >= 0 (ELECTRA's lambda: 50), "
                              f"got {self.disc_weight!r}")
        if isinstance(self.temperature, bool) or not 0 < self.temperature < float("inf"):
            raise ConfigError(f"objective.temperature must be a finite number > 0 (1 = the generator's softmax), "
                              f"got {self.temperature!r}")
        check_mlm_fields(self)


class ELECTRACollator(Collator):
    """The ``mlm`` collator's batch, plus ``sample_seed`` [B]: the seed of the generator's sampling."""

    def __init__(self, cfg: ELECTRAConfig, vocab, tokenizer):
        self.mlm = MLMCollator(cfg, vocab, tokenizer)

    def __call__(self, blocks: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out = self.mlm(blocks, gen)
        out["sample_seed"] = torch.randint(0, 2**62, (blocks.shape[0],), generator=gen)
        return out


def generator_sizes(model, cfg: ELECTRAConfig) -> dict[str, int]:
    """Hidden size, layers, heads and feed-forward width of the generator for ``model``."""
    mcfg = model.cfg
    D, n_head = model.d_model, mcfg.n_head
    hidden = round(cfg.generator_size * D)
    layers = round(cfg.generator_layers * mcfg.n_layer)
    if hidden < 1 or layers < 1:
        raise ConfigError(
            f"objective.generator_size={cfg.generator_size} and objective.generator_layers={cfg.generator_layers} "
            f"give a generator of {hidden} hidden units × {layers} layers for a {mcfg.n_layer}×{D} discriminator; "
            f"raise them so both are at least 1")
    heads = max(1, min(hidden // (D // n_head), hidden))
    while hidden % heads:
        heads -= 1
    d_ff = mcfg.d_ff or 4 * D
    return {"d_model": hidden, "n_layer": layers, "n_head": heads, "d_ff": max(1, round(d_ff * hidden / D))}


def shared_embeddings(model, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
    """The discriminator's embedding layer (token + position + segment, LayerNorm, dropout) at its
    embedding width, before any projection to its hidden size (ALBERT's E→H): [B, T, E]."""
    x = sum_embeddings(input_ids, model.wte, model.wpe, model.wtte, token_type_ids, model.max_seq_len, position_ids)
    return model.drop(model.ln_emb(x))


class Generator(nn.Module):
    """ELECTRA's small MLM generator, minus the embedding layer it shares with the discriminator."""

    def __init__(self, embedding_size: int, vocab_size: int, d_model: int, n_layer: int, n_head: int, d_ff: int, *,
                 dropout: float = 0.0, activation: str = "gelu_exact", eps: float = 1e-12, pre_ln: bool = False,
                 init_std: float = 0.02):
        super().__init__()
        self.project = nn.Linear(embedding_size, d_model) if embedding_size != d_model else None
        self.blocks = nn.ModuleList(
            PostLNBlock(d_model, n_head, d_ff, dropout, activation=activation, eps=eps, pre_ln=pre_ln)
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, eps=eps) if pre_ln else None
        self.head = MLMHead(d_model, embedding_size, activation, eps)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        initialize(self, "normal", init_std, n_layer, residual_names=())

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False) -> torch.Tensor:
        x = embeddings if self.project is None else self.project(embeddings)
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal)
        return x if self.ln_f is None else self.ln_f(x)

    def logits(self, hidden: torch.Tensor, output_embedding: torch.Tensor) -> torch.Tensor:
        """MLM logits with the shared (tied) word embedding: ``head(h) @ E.T + bias``."""
        return self.head(hidden) @ output_embedding.t() + self.lm_bias


def gumbel_sample(logits: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` [N, V] from softmax(logits), by Gumbel-max; no gradient."""
    # Gumbel noise -log(E), E ~ Exp(1) (= -log U)
    e = torch.empty(logits.shape, device=logits.device, dtype=torch.float32).exponential_(generator=gen)
    return (logits.detach().float() - e.clamp(min=torch.finfo(torch.float32).tiny).log()).argmax(-1)


class ELECTRA(MLM):
    """Replaced token detection: generator MLM + λ · discriminator BCE on ``[CLS] block [SEP]``."""

    kinds = ("encoder",)
    needs = frozenset({"token_type_ids"})  # all zeros; document_ids too with document_mask=true

    def __init__(self, cfg: ELECTRAConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.generator: Generator | None = None
        self.disc_head: nn.Module | None = None

    def make_collator(self) -> Collator:
        return ELECTRACollator(self.cfg, self.vocab, self.tokenizer)

    def attach(self, model) -> None:
        missing = [a for a in SHARED_EMBEDDING_ATTRS + ("cfg", "d_model", "output_embedding") if not hasattr(model, a)]
        if missing:
            raise ConfigError(
                f"objective 'electra' shares the discriminator's embedding layer with its generator and needs a "
                f"BERT-style encoder (attributes {', '.join(SHARED_EMBEDDING_ATTRS)}); {type(model).__name__} lacks "
                f"{', '.join(missing)}. Use model=bert_tiny or model=albert_tiny.")
        super().attach(model)  # freezes the [CLS] pooler
        for name in ("head", "lm_bias"):  # the discriminator's own MLM head is not trained by ELECTRA
            part = getattr(model, name, None)
            if isinstance(part, (nn.Module, nn.Parameter)):
                part.requires_grad_(False)
        if self.generator is None:
            mcfg = model.cfg
            sizes = generator_sizes(model, self.cfg)
            E = model.output_embedding().shape[1]
            self.generator = Generator(
                E, model.output_embedding().shape[0], sizes["d_model"], sizes["n_layer"], sizes["n_head"],
                sizes["d_ff"], dropout=getattr(mcfg, "dropout", 0.0), activation=getattr(mcfg, "activation", "gelu"),
                eps=getattr(mcfg, "layer_norm_eps", 1e-12), pre_ln=getattr(mcfg, "pre_ln", False),
                init_std=getattr(mcfg, "init_std", 0.02))
            D = model.d_model
            self.disc_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 1))
            initialize(self.disc_head, "normal", getattr(mcfg, "init_std", 0.02), 1, residual_names=())

    # -- the two networks ----------------------------------------------------------
    def generator_logits(self, model, batch) -> torch.Tensor:
        """The generator's MLM logits at the selected positions (``labels != -100``): [N, V]."""
        ids = batch["input_ids"]
        attn_mask, position_ids = apply_documents(batch.get("document_ids"), False, None)
        T = ids.shape[1]
        mask, is_causal = build_attention_bias(mask_or_none(batch.get("padding_mask")), attn_mask, False, T, T,
                                               ids.device)
        emb = shared_embeddings(model, ids, batch.get("token_type_ids"), position_ids)
        hidden = self.generator(emb, mask, is_causal)
        return self.generator.logits(hidden[batch["labels"] != IGNORE_INDEX], model.output_embedding())

    def corrupt(self, batch, gen_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(discriminator input ids, original ids, replaced labels): each selected position gets a token
        sampled from the generator; labelled 1 only where that token differs from the original."""
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        original = torch.where(selected, labels, batch["input_ids"])
        seed = batch.get("sample_seed")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=gen_logits.device).manual_seed(int(seed[0]))
        sampled = gumbel_sample(gen_logits / self.cfg.temperature, gen)
        disc_ids = original.clone()
        disc_ids[selected] = sampled
        return disc_ids, original, (disc_ids != original).float()

    def disc_logits(self, model, batch, disc_ids: torch.Tensor) -> torch.Tensor:
        """The discriminator's replaced-token logits for every position: [B, T]."""
        hidden = self.encode(model, {**batch, "input_ids": disc_ids})
        return self.disc_head(hidden).squeeze(-1)

    def discriminator_loss(self, model, batch, gen_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample replacements from ``gen_logits``, run the discriminator, and score it: ``loss`` (BCE mean
        over non-pad tokens), ``logits`` [B, T], ``replaced`` [B, T] (labels), ``real`` [B, T] (non-pad)."""
        disc_ids, _, replaced = self.corrupt(batch, gen_logits)
        logits = self.disc_logits(model, batch, disc_ids).float()
        real = batch.get("padding_mask")
        real = torch.ones_like(replaced, dtype=torch.bool) if real is None else real.bool()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, replaced, reduction="none")
        loss = (bce * real).sum() / real.sum().clamp(min=1)
        return {"loss": loss, "logits": logits, "replaced": replaced, "real": real}

    def loss(self, model, batch) -> LossOutput:
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        gen_logits = self.generator_logits(model, batch)
        out = self.lm_nll(gen_logits, labels[selected])
        disc = self.discriminator_loss(model, batch, gen_logits)
        gen_loss = out.loss_sum.detach() / out.n_targets.clamp(min=1)
        out.loss_sum = out.loss_sum + self.cfg.disc_weight * disc["loss"] * out.n_targets
        replaced, real = disc["replaced"], disc["real"]
        correct = ((disc["logits"] > 0).float() == replaced) & real
        out.logs = {
            "gen_loss": gen_loss,
            "disc_loss": disc["loss"].detach(),
            "disc_acc": correct.sum().float() / real.sum().clamp(min=1),
            "replaced_frac": replaced[selected].sum() / selected.sum().clamp(min=1),
        }
        return out
