"""lmkit ``bert`` <-> Hugging Face ``BertForMaskedLM`` (``BertForPreTraining`` with an NSP head).

lmkit's fused qkv is split into query/key/value; the MLM head's decoder is tied to the word
embedding and its bias is ``cls.predictions.bias`` (lmkit's ``lm_bias``). NSP's pair head is
``cls.seq_relationship`` (label 0 = B follows A in both). A model without segment embeddings
(``type_vocab_size=0``) is exported with one zero segment row (the same sums). HF's BERT is
post-LN with the MLM transform: ``pre_ln=true`` and ``head_transform=false`` are refused.
"""
from __future__ import annotations

from lmkit.errors import ConfigError
from lmkit.interop.family import Family, Field, activation_from_hf, activation_to_hf
from lmkit.interop.table import Rename, Split, Table, Tied, Zeros, expand
from lmkit.models.bert import BERT, BERTConfig

P = "bert."


def linear(hf: str, lm: str) -> list:
    return [Rename(f"{hf}.weight", f"{lm}.weight"), Rename(f"{hf}.bias", f"{lm}.bias")]


def qkv(hf_q: str, hf_k: str, hf_v: str, lm: str) -> list:
    return [Split((f"{hf_q}.weight", f"{hf_k}.weight", f"{hf_v}.weight"), f"{lm}.weight"),
            Split((f"{hf_q}.bias", f"{hf_k}.bias", f"{hf_v}.bias"), f"{lm}.bias")]


def _table(cfg: BERTConfig, heads: set) -> Table:
    L = P + "encoder.layer.{i}."
    layer = (qkv(L + "attention.self.query", L + "attention.self.key", L + "attention.self.value", "blocks.{i}.attn.qkv")
             + linear(L + "attention.output.dense", "blocks.{i}.attn.proj")
             + linear(L + "attention.output.LayerNorm", "blocks.{i}.ln_1")
             + linear(L + "intermediate.dense", "blocks.{i}.mlp.fc")
             + linear(L + "output.dense", "blocks.{i}.mlp.proj")
             + linear(L + "output.LayerNorm", "blocks.{i}.ln_2"))
    E = P + "embeddings."
    rules = [Rename(E + "word_embeddings.weight", "wte.weight"), Rename(E + "position_embeddings.weight", "wpe.weight")]
    if cfg.type_vocab_size > 0:
        rules.append(Rename(E + "token_type_embeddings.weight", "wtte.weight"))
    else:
        rules.append(Zeros(E + "token_type_embeddings.weight", (1, cfg.d_model),
                           "lmkit's bert with type_vocab_size=0 has no segment embeddings"))
    rules += linear(E + "LayerNorm", "ln_emb") + expand(layer, cfg.n_layer)
    if cfg.pooler and "pair" in heads:
        rules += linear(P + "pooler.dense", "pooler.dense")
    rules += linear("cls.predictions.transform.dense", "head.dense") + linear("cls.predictions.transform.LayerNorm", "head.ln")
    rules += [Rename("cls.predictions.bias", "lm_bias"),
              Tied("cls.predictions.decoder.weight", E + "word_embeddings.weight"),
              Tied("cls.predictions.decoder.bias", "cls.predictions.bias")]
    if "pair" in heads:
        rules += linear("cls.seq_relationship", "objective.pair_head")
    return Table(rules, ignore_hf=(r"embeddings\.position_ids$",))


POOLER_WHY = ("the [CLS] pooler: without a sentence-pair head it is frozen and untrained, and BertForMaskedLM has "
              "no pooler")


def _check(cfg: BERTConfig, heads: set) -> None:
    if cfg.pre_ln:
        raise ConfigError("bert: model.pre_ln=true has no Hugging Face counterpart (HF's BERT is post-LN); "
                          "export supports the post-LN BERT only")
    if not cfg.head_transform:
        raise ConfigError("bert: model.head_transform=false has no Hugging Face counterpart (BertForMaskedLM always "
                          "applies the dense+GELU+LayerNorm transform before the tied decoder)")
    if "pair" in heads and not cfg.pooler:
        raise ConfigError("bert: an NSP head needs the [CLS] pooler (model.pooler=true)")


def _type_vocab(v, c):
    return max(v, 1)


def exported_with(hf: dict, key: str, value) -> bool:
    """lmkit's own export of a model with ``key=value`` (recorded in config.json's ``lmkit`` entry)."""
    hint = hf.get("lmkit") if isinstance(hf.get("lmkit"), dict) else {}
    return (hint.get("config") or {}).get(key) == value


def _type_vocab_from_hf(v, hf):
    return 0 if v == 1 and exported_with(hf, "type_vocab_size", 0) else v


def _extra_from_hf(hf: dict, state: dict) -> dict:
    return {"pooler": any(k.endswith("pooler.dense.weight") for k in state)}


FAMILY = Family(
    name="bert", model_type="bert", config_cls=BERTConfig, model_cls=BERT,
    fields=[
        Field("num_hidden_layers", "n_layer"), Field("num_attention_heads", "n_head"), Field("hidden_size", "d_model"),
        Field("intermediate_size", "d_ff", lambda v, c: v or 4 * c.d_model),
        Field("max_position_embeddings", "max_seq_len"), Field("vocab_size", "vocab_size"),
        Field("type_vocab_size", "type_vocab_size", _type_vocab, _type_vocab_from_hf),
        Field("hidden_dropout_prob", "dropout"), Field("attention_probs_dropout_prob", None, lambda v, c: c.dropout),
        Field("layer_norm_eps", "layer_norm_eps"),
        Field("hidden_act", "activation", lambda v, c: activation_to_hf(v), lambda v, hf: activation_from_hf(v, "bert")),
        Field("initializer_range", "init_std"),
    ],
    fixed={"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False},
    check=_check, table=_table, auto_class="AutoModelForMaskedLM",
    architecture=lambda heads: "BertForPreTraining" if "pair" in heads else "BertForMaskedLM",
    left_out=lambda cfg, heads: {"pooler.": POOLER_WHY} if cfg.pooler and "pair" not in heads else {},
    pair_hf="cls.seq_relationship.weight", from_hf_extra=_extra_from_hf,
)
