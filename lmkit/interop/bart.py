"""lmkit ``bart`` <-> Hugging Face ``BartForConditionalGeneration``.

HF's learned positions carry 2 unused leading rows (position p is row p + 2, a fairseq
artefact): written as zeros, dropped on import. ``final_logits_bias`` (a buffer lmkit's
BART does not have) is written as zeros and must be zero on import. The embedding is
shared by both stacks and the head (tied; not repeated in the file). HF's BART LayerNorms
use eps 1e-5, so another ``layer_norm_eps`` is refused.
"""
from __future__ import annotations

from lmkit.errors import ConfigError
from lmkit.interop.bert import linear
from lmkit.interop.family import Family, Field, activation_from_hf, activation_to_hf
from lmkit.interop.table import PadRows, Rename, Split, Table, Tied, Zeros, expand
from lmkit.models.bart import BART, BARTConfig

OFFSET = 2


def _attn(hf: str, lm: str, fused: str) -> list:
    """HF q/k/v_proj + out_proj <-> lmkit's fused qkv (self) or q + kv (cross) + proj."""
    rules = []
    for p in ("weight", "bias"):
        if fused == "qkv":
            rules.append(Split((f"{hf}q_proj.{p}", f"{hf}k_proj.{p}", f"{hf}v_proj.{p}"), f"{lm}qkv.{p}"))
        else:
            rules.append(Split((f"{hf}k_proj.{p}", f"{hf}v_proj.{p}"), f"{lm}kv.{p}"))
    if fused != "qkv":
        rules += linear(f"{hf}q_proj", f"{lm}q")
    return rules + linear(f"{hf}out_proj", f"{lm}proj")


def _stack(side: str, n: int, cross: bool) -> list:
    hf, lm = f"model.{side}.layers.{{i}}.", f"{side}.blocks.{{i}}."
    layer = (_attn(hf + "self_attn.", lm + "attn.", "qkv") + linear(hf + "self_attn_layer_norm", lm + "ln_1")
             + linear(hf + "fc1", lm + "mlp.fc") + linear(hf + "fc2", lm + "mlp.proj")
             + linear(hf + "final_layer_norm", lm + "ln_2"))
    if cross:
        layer += _attn(hf + "encoder_attn.", lm + "cross_attn.", "kv") + linear(hf + "encoder_attn_layer_norm", lm + "ln_x")
    return ([PadRows(f"model.{side}.embed_positions.weight", f"{side}.wpe.weight", OFFSET),
             Tied(f"model.{side}.embed_tokens.weight", "model.shared.weight")]
            + linear(f"model.{side}.layernorm_embedding", f"{side}.layernorm_embedding") + expand(layer, n))


def _table(cfg: BARTConfig, heads: set) -> Table:
    n_dec = cfg.n_layer if cfg.n_decoder_layer is None else cfg.n_decoder_layer
    rules = [Rename("model.shared.weight", "shared.weight")]
    rules += _stack("encoder", cfg.n_layer, False) + _stack("decoder", n_dec, True)
    rules += [Tied("lm_head.weight", "model.shared.weight"),
              Zeros("final_logits_bias", (1, cfg.vocab_size), "lmkit's bart has no final logits bias")]
    return Table(rules, ignore_hf=(r"^model\.(en|de)coder\.version$",))


def _check(cfg: BARTConfig, heads: set) -> None:
    if heads:
        raise ConfigError(f"bart: objective heads {sorted(heads)} have no place in BartForConditionalGeneration")
    if abs(cfg.layer_norm_eps - 1e-5) > 1e-12:
        raise ConfigError(f"bart: model.layer_norm_eps={cfg.layer_norm_eps} has no Hugging Face counterpart (HF's "
                          f"BART LayerNorms use eps 1e-5)")


def _same_stacks(hf: dict) -> dict:
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if enc in hf and dec in hf and hf[enc] != hf[dec]:
            raise ConfigError(f"bart config.json has {enc}={hf[enc]} but {dec}={hf[dec]}; lmkit's bart uses one "
                              f"size for both stacks")
    return {}


FAMILY = Family(
    name="bart", model_type="bart", config_cls=BARTConfig, model_cls=BART,
    fields=[
        Field("encoder_layers", "n_layer"),
        Field("decoder_layers", "n_decoder_layer", lambda v, c: c.n_layer if v is None else v),
        Field("encoder_attention_heads", "n_head"), Field("decoder_attention_heads", None, lambda v, c: c.n_head),
        Field("d_model", "d_model"),
        Field("encoder_ffn_dim", "d_ff", lambda v, c: v or 4 * c.d_model),
        Field("decoder_ffn_dim", None, lambda v, c: c.d_ff or 4 * c.d_model),
        Field("max_position_embeddings", "max_seq_len"), Field("vocab_size", "vocab_size"),
        Field("dropout", "dropout"), Field("attention_dropout", None, lambda v, c: c.dropout),
        Field("activation_dropout", None, lambda v, c: c.dropout),
        Field("activation_function", "activation", lambda v, c: activation_to_hf(v),
              lambda v, hf: activation_from_hf(v, "bart")),
        Field("scale_embedding", "scale_embedding"), Field("init_std", "init_std"),
    ],
    fixed={"is_encoder_decoder": True, "tie_word_embeddings": True, "add_final_layer_norm": False,
           "normalize_before": False, "add_bias_logits": False},
    check=_check, table=_table, architecture=lambda heads: "BartForConditionalGeneration",
    auto_class="AutoModelForSeq2SeqLM", from_hf_extra=lambda hf, state: _same_stacks(hf),
)
