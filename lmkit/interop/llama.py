"""lmkit ``llama`` <-> Hugging Face ``LlamaForCausalLM``.

lmkit's llama uses HF's layout throughout: separate q/k/v/o projections (k and v with
``num_key_value_heads`` heads), RoPE in the half-split (``rotate_half``) layout, so no
permutation of q/k rows in either direction; SwiGLU ``gate``/``fc``/``proj`` are
gate_proj/up_proj/down_proj. A tied head is left out of the file (transformers re-ties it),
an untied one is ``lm_head.weight``. HF options lmkit's llama does not compute are refused on
import: ``rope_scaling`` (Llama 3.1's "llama3" frequency scaling, linear, dynamic ...),
attention/MLP biases, an activation other than SiLU, a ``head_dim`` other than
hidden_size / num_attention_heads.
"""
from __future__ import annotations

from lmkit.errors import ConfigError
from lmkit.interop.family import Field, Family
from lmkit.interop.table import Rename, Table, Tied, expand
from lmkit.models.llama import Llama, LlamaConfig
from lmkit.models.local_attention import refuse_export

P = "model."


def _table(cfg: LlamaConfig, heads: set) -> Table:
    L = P + "layers.{i}."
    layer = [
        Rename(L + "input_layernorm.weight", "blocks.{i}.ln_1.weight"),
        Rename(L + "self_attn.q_proj.weight", "blocks.{i}.attn.q.weight"),
        Rename(L + "self_attn.k_proj.weight", "blocks.{i}.attn.k.weight"),
        Rename(L + "self_attn.v_proj.weight", "blocks.{i}.attn.v.weight"),
        Rename(L + "self_attn.o_proj.weight", "blocks.{i}.attn.proj.weight"),
        Rename(L + "post_attention_layernorm.weight", "blocks.{i}.ln_2.weight"),
        Rename(L + "mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
        Rename(L + "mlp.up_proj.weight", "blocks.{i}.mlp.fc.weight"),
        Rename(L + "mlp.down_proj.weight", "blocks.{i}.mlp.proj.weight"),
    ]
    rules = [Rename(P + "embed_tokens.weight", "wte.weight")]
    rules += expand(layer, cfg.n_layer)
    rules.append(Rename(P + "norm.weight", "ln_f.weight"))
    rules.append(Tied("lm_head.weight", P + "embed_tokens.weight") if cfg.tie_embeddings
                 else Rename("lm_head.weight", "lm_head.weight"))
    return Table(rules, ignore_hf=(r"rotary_emb\.inv_freq$",))


def _check(cfg: LlamaConfig, heads: set) -> None:
    if heads:
        raise ConfigError(f"llama: objective heads {sorted(heads)} have no place in LlamaForCausalLM")
    refuse_export(cfg, "llama", "LlamaForCausalLM")


def _from_hf_extra(hf: dict, state: dict) -> dict:
    hidden, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and hidden is not None and heads is not None and head_dim * heads != hidden:
        raise ConfigError(f"llama config.json has head_dim={head_dim} x num_attention_heads={heads} != "
                          f"hidden_size={hidden}; lmkit's llama needs head_dim * num_attention_heads == hidden_size")
    scaling = hf.get("rope_scaling")
    if scaling is None and isinstance(hf.get("rope_parameters"), dict):  # transformers 5 spelling
        params = hf["rope_parameters"]
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        raise ConfigError(f"llama config.json has rope_scaling of type {kind!r}; lmkit's llama computes plain RoPE "
                          f"only (rope_scaling null)")
    out = {}
    if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), dict) and \
            "rope_theta" in hf["rope_parameters"]:
        out["rope_theta"] = float(hf["rope_parameters"]["rope_theta"])
    return out


FAMILY = Family(
    name="llama", model_type="llama", config_cls=LlamaConfig, model_cls=Llama,
    fields=[
        Field("num_hidden_layers", "n_layer"), Field("num_attention_heads", "n_head"),
        Field("num_key_value_heads", "n_kv_head", lambda v, c: c.kv_heads),
        Field("hidden_size", "d_model"), Field("intermediate_size", "d_ff", lambda v, c: c.ffn_size),
        Field("head_dim", None, lambda v, c: c.head_dim),
        Field("max_position_embeddings", "max_seq_len"), Field("vocab_size", "vocab_size"),
        Field("attention_dropout", "dropout"),
        Field("rope_theta", "rope_theta", lambda v, c: float(v), lambda v, hf: float(v)),
        Field("rms_norm_eps", "rms_norm_eps"),
        Field("tie_word_embeddings", "tie_embeddings"),
        Field("initializer_range", "init_std"),
    ],
    fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None},
    check=_check, table=_table, architecture=lambda heads: "LlamaForCausalLM", auto_class="AutoModelForCausalLM",
    from_hf_extra=_from_hf_extra,
)
