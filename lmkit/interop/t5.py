"""lmkit ``t5`` <-> Hugging Face ``T5ForConditionalGeneration``.

Both compute the same function: pre-RMSNorm blocks, unscaled attention, one relative-position
table per stack (HF keeps it in block 0), and a tied head that scales the decoder output by
d_model**-0.5 (``tie_word_embeddings`` true; false = an untied ``lm_head`` without the
scaling, T5 v1.1). transformers 5 writes ``scale_decoder_outputs`` for the scaling and may tie
an unscaled head's weights (see :func:`_tied_head`). lmkit's fused qkv (and the cross-attention's kv) are split into q/k/v.
"""
from __future__ import annotations

import torch

from lmkit.errors import ConfigError
from lmkit.interop.family import Family, Field
from lmkit.interop.table import Rename, Split, Table, Tied, expand
from lmkit.models.t5 import T5, T5Config


def _ffn(hf: str, lm: str, gated: bool) -> list:
    if gated:
        return [Rename(hf + "wi_0.weight", lm + "gate.weight"), Rename(hf + "wi_1.weight", lm + "fc.weight"),
                Rename(hf + "wo.weight", lm + "proj.weight")]
    return [Rename(hf + "wi.weight", lm + "fc.weight"), Rename(hf + "wo.weight", lm + "proj.weight")]


def _self_attn(hf: str, lm: str) -> list:
    return [Split((hf + "q.weight", hf + "k.weight", hf + "v.weight"), lm + "qkv.weight"),
            Rename(hf + "o.weight", lm + "proj.weight")]


def _table(cfg: T5Config, heads: set) -> Table:
    gated = cfg.ffn == "gated-gelu"
    enc = "encoder.block.{i}.layer."
    enc_layer = (_self_attn(enc + "0.SelfAttention.", "encoder.blocks.{i}.attn.")
                 + [Rename(enc + "0.layer_norm.weight", "encoder.blocks.{i}.ln_1.weight")]
                 + _ffn(enc + "1.DenseReluDense.", "encoder.blocks.{i}.mlp.", gated)
                 + [Rename(enc + "1.layer_norm.weight", "encoder.blocks.{i}.ln_2.weight")])
    dec = "decoder.block.{i}.layer."
    x = dec + "1.EncDecAttention."
    dec_layer = (_self_attn(dec + "0.SelfAttention.", "decoder.blocks.{i}.attn.")
                 + [Rename(dec + "0.layer_norm.weight", "decoder.blocks.{i}.ln_1.weight"),
                    Rename(x + "q.weight", "decoder.blocks.{i}.cross_attn.q.weight"),
                    Split((x + "k.weight", x + "v.weight"), "decoder.blocks.{i}.cross_attn.kv.weight"),
                    Rename(x + "o.weight", "decoder.blocks.{i}.cross_attn.proj.weight"),
                    Rename(dec + "1.layer_norm.weight", "decoder.blocks.{i}.ln_x.weight")]
                 + _ffn(dec + "2.DenseReluDense.", "decoder.blocks.{i}.mlp.", gated)
                 + [Rename(dec + "2.layer_norm.weight", "decoder.blocks.{i}.ln_2.weight")])
    n_dec = cfg.n_layer if cfg.n_decoder_layer is None else cfg.n_decoder_layer
    rules = [Rename("shared.weight", "shared.weight"),
             Tied("encoder.embed_tokens.weight", "shared.weight"), Tied("decoder.embed_tokens.weight", "shared.weight")]
    rules += expand(enc_layer, cfg.n_layer) + expand(dec_layer, n_dec)
    rules += [Rename("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "encoder.relative_attention_bias.relative_attention_bias.weight"),
              Rename("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "decoder.relative_attention_bias.relative_attention_bias.weight"),
              Rename("encoder.final_layer_norm.weight", "encoder.ln_f.weight"),
              Rename("decoder.final_layer_norm.weight", "decoder.ln_f.weight")]
    rules.append(Tied("lm_head.weight", "shared.weight") if cfg.tie_embeddings else Rename("lm_head.weight", "lm_head.weight"))
    return Table(rules, ignore_hf=(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",))


def _check(cfg: T5Config, heads: set) -> None:
    if heads:
        raise ConfigError(f"t5: objective heads {sorted(heads)} have no place in T5ForConditionalGeneration")
    if cfg.d_model % cfg.n_head:
        raise ConfigError(f"t5: d_model={cfg.d_model} is not divisible by n_head={cfg.n_head}")


def _d_kv_check(hf: dict, state: dict) -> dict:
    d_kv, d_model, heads = hf.get("d_kv"), hf.get("d_model"), hf.get("num_heads")
    if d_kv is not None and d_model is not None and heads is not None and d_kv * heads != d_model:
        raise ConfigError(f"t5 config.json has d_kv={d_kv} x num_heads={heads} != d_model={d_model}; lmkit's t5 "
                          f"needs d_kv * num_heads == d_model")
    ffn = hf.get("feed_forward_proj", "relu")
    if ffn not in ("relu", "gated-gelu"):
        raise ConfigError(f"t5 config.json has feed_forward_proj={ffn!r}; lmkit's t5 supports 'relu' and 'gated-gelu'")
    return {"ffn": ffn, "tie_embeddings": _tied_head(hf, state)}


def _tied_head(hf: dict, state: dict) -> bool:
    """Whether the file's head is lmkit's tied, rescaled one (True) or an untied, unscaled one (False).

    transformers 5 separates the rescaling (``scale_decoder_outputs``) from tying the weights: a T5
    v1.1 it creates has an unscaled head that shares the embedding, and saves no ``lm_head.weight``.
    That head is lmkit's untied head holding a copy of the embedding (added to ``state`` here).
    Older files: ``tie_word_embeddings`` (default true) means both.
    """
    scaled = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    own_head = head is not None and shared is not None and not torch.equal(head, shared)
    if scaled and own_head:
        raise ConfigError("t5 config.json rescales the decoder output (tied head) but the file holds its own "
                          "lm_head.weight: lmkit's t5 rescales only a head tied to the embedding")
    if not scaled and head is None and shared is not None:
        state["lm_head.weight"] = shared.clone()
    return scaled


FAMILY = Family(
    name="t5", model_type="t5", config_cls=T5Config, model_cls=T5,
    fields=[
        Field("num_layers", "n_layer"),
        Field("num_decoder_layers", "n_decoder_layer", lambda v, c: c.n_layer if v is None else v),
        Field("num_heads", "n_head"), Field("d_model", "d_model"), Field("d_kv", None, lambda v, c: c.d_model // c.n_head),
        Field("d_ff", "d_ff", lambda v, c: v or 4 * c.d_model), Field("vocab_size", "vocab_size"),
        Field("dropout_rate", "dropout"), Field("feed_forward_proj", "ffn"),
        Field("relative_attention_num_buckets", "num_buckets"),
        Field("relative_attention_max_distance", "max_distance"),
        Field("tie_word_embeddings", "tie_embeddings"), Field("layer_norm_epsilon", "layer_norm_eps"),
        Field("initializer_factor", "init_factor"),
        Field("n_positions", "max_seq_len"),
    ],
    fixed={"is_encoder_decoder": True},
    check=_check, table=_table, architecture=lambda heads: "T5ForConditionalGeneration",
    auto_class="AutoModelForSeq2SeqLM", from_hf_extra=_d_kv_check,
)
