"""lmkit ``albert`` <-> Hugging Face ``AlbertForMaskedLM`` (``AlbertForPreTraining`` with a SOP head).

HF shares whole layers in groups: ``share="all"`` is one group used by every layer
(``num_hidden_groups=1``), ``share="none"`` one group per layer. lmkit's checkpoint names the
shared tensors once per layer (``blocks.1.attn...`` repeats ``blocks.0.attn...``); the table
checks the repeats on export and fills them in on import. ``share="attention"``/``"ffn"``
(part of a layer shared) cannot be expressed in HF's ALBERT and is refused. SOP's pair
head is ``sop_classifier.classifier`` (label 0 = the original order in both).
"""
from __future__ import annotations

from lmkit.errors import ConfigError
from lmkit.interop.bert import exported_with, linear, qkv
from lmkit.interop.family import Family, Field, activation_from_hf, activation_to_hf
from lmkit.interop.table import LmkitAlias, Rename, Table, Tied, Zeros, expand
from lmkit.models.albert import ALBERT, ALBERTConfig

P = "albert."
BLOCK_PARTS = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "ln_1.weight", "ln_1.bias",
               "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias", "ln_2.weight", "ln_2.bias")


def _table(cfg: ALBERTConfig, heads: set) -> Table:
    G = P + "encoder.albert_layer_groups.{i}.albert_layers.0."
    layer = (qkv(G + "attention.query", G + "attention.key", G + "attention.value", "blocks.{i}.attn.qkv")
             + linear(G + "attention.dense", "blocks.{i}.attn.proj")
             + linear(G + "attention.LayerNorm", "blocks.{i}.ln_1")
             + linear(G + "ffn", "blocks.{i}.mlp.fc")
             + linear(G + "ffn_output", "blocks.{i}.mlp.proj")
             + linear(G + "full_layer_layer_norm", "blocks.{i}.ln_2"))
    E = P + "embeddings."
    rules = [Rename(E + "word_embeddings.weight", "wte.weight"), Rename(E + "position_embeddings.weight", "wpe.weight")]
    if cfg.type_vocab_size > 0:
        rules.append(Rename(E + "token_type_embeddings.weight", "wtte.weight"))
    else:
        rules.append(Zeros(E + "token_type_embeddings.weight", (1, cfg.embedding_size),
                           "lmkit's albert with type_vocab_size=0 has no segment embeddings"))
    rules += linear(E + "LayerNorm", "ln_emb") + linear(P + "encoder.embedding_hidden_mapping_in", "embedding_hidden_mapping_in")
    if cfg.share == "all":
        rules += expand(layer, 1)
        rules += [LmkitAlias(f"blocks.{i}.{part}", f"blocks.0.{part}") for i in range(1, cfg.n_layer) for part in BLOCK_PARTS]
    else:
        rules += expand(layer, cfg.n_layer)
    if cfg.pooler and "pair" in heads:
        rules += linear(P + "pooler", "pooler.dense")
    rules += linear("predictions.dense", "head.dense") + linear("predictions.LayerNorm", "head.ln")
    rules += [Rename("predictions.bias", "lm_bias"), Tied("predictions.decoder.weight", E + "word_embeddings.weight"),
              Tied("predictions.decoder.bias", "predictions.bias", write=True)]  # transformers 4.46 reads this one
    if "pair" in heads:
        rules += linear("sop_classifier.classifier", "objective.pair_head")
    return Table(rules, ignore_hf=(r"embeddings\.position_ids$",))


POOLER_WHY = ("the [CLS] pooler: without a sentence-pair head it is frozen and untrained, and AlbertForMaskedLM has "
              "no pooler")


def _check(cfg: ALBERTConfig, heads: set) -> None:
    if cfg.share not in ("all", "none"):
        raise ConfigError(f"albert: model.share={cfg.share} has no Hugging Face counterpart (HF's ALBERT shares whole "
                          f"layers: share=all or share=none)")
    if "pair" in heads and not cfg.pooler:
        raise ConfigError("albert: a SOP head needs the [CLS] pooler (model.pooler=true)")


def _groups_to_hf(share, cfg):
    return 1 if share == "all" else cfg.n_layer


def _extra_from_hf(hf: dict, state: dict) -> dict:
    groups, layers = hf.get("num_hidden_groups", 1), hf.get("num_hidden_layers", 12)
    if hf.get("inner_group_num", 1) != 1:
        raise ConfigError(f"albert config.json has inner_group_num={hf['inner_group_num']}; lmkit's albert has one "
                          f"layer per group (inner_group_num=1)")
    if groups not in (1, layers):
        raise ConfigError(f"albert config.json has num_hidden_groups={groups} of {layers} layers; lmkit's albert "
                          f"shares all layers (1 group) or none ({layers} groups)")
    if layers > 1:
        share = "all" if groups == 1 else "none"
    else:  # one layer: both read the same; keep what lmkit exported
        share = "none" if exported_with(hf, "share", "none") else "all"
    return {"share": share,
            "pooler": any(k.endswith("pooler.weight") for k in state)}


def _type_vocab_from_hf(v, hf):
    return 0 if v == 1 and exported_with(hf, "type_vocab_size", 0) else v


FAMILY = Family(
    name="albert", model_type="albert", config_cls=ALBERTConfig, model_cls=ALBERT,
    fields=[
        Field("num_hidden_layers", "n_layer"), Field("num_attention_heads", "n_head"), Field("hidden_size", "d_model"),
        Field("intermediate_size", "d_ff", lambda v, c: v or 4 * c.d_model), Field("embedding_size", "embedding_size"),
        Field("max_position_embeddings", "max_seq_len"), Field("vocab_size", "vocab_size"),
        Field("type_vocab_size", "type_vocab_size", lambda v, c: max(v, 1), _type_vocab_from_hf),
        Field("num_hidden_groups", None, lambda v, c: _groups_to_hf(c.share, c)),
        Field("hidden_dropout_prob", "dropout"), Field("attention_probs_dropout_prob", None, lambda v, c: c.dropout),
        Field("layer_norm_eps", "layer_norm_eps"),
        Field("hidden_act", "activation", lambda v, c: activation_to_hf(v), lambda v, hf: activation_from_hf(v, "albert")),
        Field("initializer_range", "init_std"),
    ],
    fixed={"inner_group_num": 1, "position_embedding_type": "absolute"},
    check=_check, table=_table, auto_class="AutoModelForMaskedLM",
    architecture=lambda heads: "AlbertForPreTraining" if "pair" in heads else "AlbertForMaskedLM",
    left_out=lambda cfg, heads: {"pooler.": POOLER_WHY} if cfg.pooler and "pair" not in heads else {},
    pair_hf="sop_classifier.classifier.weight", from_hf_extra=_extra_from_hf,
)
