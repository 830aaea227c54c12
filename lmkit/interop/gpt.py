"""lmkit ``gpt`` <-> Hugging Face ``GPT2LMHeadModel``.

GPT-2 stores its projections as Conv1D ([in, out], transposed); the fused qkv is fused in
both. ``bias=false`` is exported as zero biases (the same function); the tied head is left
out of the file (transformers re-ties it), an untied one is ``lm_head.weight``.
"""
from __future__ import annotations

from lmkit.errors import ConfigError
from lmkit.interop.family import Family, Field
from lmkit.interop.table import Rename, Table, Tied, Zeros, expand
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.local_attention import refuse_export

P = "transformer."


def _table(cfg: GPTConfig, heads: set) -> Table:
    D = cfg.d_model
    F = cfg.d_ff or 4 * D
    layer = [
        Rename(P + "h.{i}.ln_1.weight", "blocks.{i}.ln_1.weight"),
        Rename(P + "h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.weight", transpose=True),
        Rename(P + "h.{i}.attn.c_proj.weight", "blocks.{i}.attn.proj.weight", transpose=True),
        Rename(P + "h.{i}.ln_2.weight", "blocks.{i}.ln_2.weight"),
        Rename(P + "h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc.weight", transpose=True),
        Rename(P + "h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.proj.weight", transpose=True),
    ]
    biases = [("h.{i}.ln_1.bias", "blocks.{i}.ln_1.bias", D), ("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias", 3 * D),
              ("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.proj.bias", D), ("h.{i}.ln_2.bias", "blocks.{i}.ln_2.bias", D),
              ("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc.bias", F), ("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.proj.bias", D)]
    why = "lmkit's gpt with bias=false has no biases"
    for hf, lm, n in biases:
        layer.append(Rename(P + hf, lm) if cfg.bias else Zeros(P + hf, (n,), why))
    rules = [Rename(P + "wte.weight", "wte.weight"), Rename(P + "wpe.weight", "wpe.weight")]
    rules += expand(layer, cfg.n_layer)
    rules.append(Rename(P + "ln_f.weight", "ln_f.weight"))
    rules.append(Rename(P + "ln_f.bias", "ln_f.bias") if cfg.bias else Zeros(P + "ln_f.bias", (D,), why))
    rules.append(Tied("lm_head.weight", P + "wte.weight") if cfg.tie_embeddings else Rename("lm_head.weight", "lm_head.weight"))
    return Table(rules, ignore_hf=(r"\.attn\.(masked_)?bias$",))


def _check(cfg: GPTConfig, heads: set) -> None:
    if heads:
        raise ConfigError(f"gpt: objective heads {sorted(heads)} have no place in GPT2LMHeadModel")
    refuse_export(cfg, "gpt", "GPT2LMHeadModel")


FAMILY = Family(
    name="gpt", model_type="gpt2", config_cls=GPTConfig, model_cls=GPT,
    fields=[
        Field("n_layer", "n_layer"), Field("n_head", "n_head"), Field("n_embd", "d_model"),
        Field("n_positions", "max_seq_len"), Field("vocab_size", "vocab_size"),
        Field("n_inner", "d_ff"),
        Field("resid_pdrop", "dropout"), Field("embd_pdrop", None, lambda v, c: c.dropout),
        Field("attn_pdrop", None, lambda v, c: c.dropout),
        Field("tie_word_embeddings", "tie_embeddings"),
    ],
    fixed={"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
           "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False},
    accepted={"activation_function": ("gelu_new", "gelu_pytorch_tanh")},
    check=_check, table=_table, architecture=lambda heads: "GPT2LMHeadModel", auto_class="AutoModelForCausalLM",
    extra_hf=lambda cfg, tok: {"n_ctx": cfg.max_seq_len},
)
