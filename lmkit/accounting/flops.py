"""Model FLOPs of training: ``6N + 12·L·H·Q·T`` per token, the form of docs/benchmarks.md.

``N`` is the parameters a token is multiplied with: every parameter except the lookup
tables (token, position, segment and relative-position embeddings), plus the output head
(V×d, counted once whether or not it is tied to the input embedding). A weight shared by
several layers (ALBERT) counts once per layer that uses it; a mixture-of-experts layer
counts what one token activates (``top_k`` experts and the router). The [CLS] pooler runs
once per sequence, not per token, and is left out. Each such parameter costs 2 FLOPs per
token forward and 4 backward: ``6N``. Attention adds ``12·L·H·Q·T`` (scores and the
weighted sum, 4·H·Q·T forward per layer, times 3 with the backward; causal attention is
counted over all T keys, as PaLM's MFU does; a locally banded layer of ``alternating_local`` over
its W keys). Encoder–decoders count their two sides:
an encoder token ``6·N_enc + 12·L_enc·H·Q·S``, a decoder token ``6·N_dec + 12·L_dec·H·Q·(T + S)``
(self-attention over T decoder positions, cross-attention over S encoder positions); the
cross-attention key/value projections run on encoder tokens, so they belong to ``N_enc``.

Not counted: norms' and activations' arithmetic, softmax, the loss, the optimizer, and any
recomputation (activation checkpointing): "model FLOPs", not hardware FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmkit.errors import ConfigError
from lmkit.models.base import count_parameters

ANALYTIC_ARCHITECTURES = ("gpt", "llama", "bert", "albert", "t5", "bart")


@dataclass(frozen=True)
class FlopsModel:
    """The parameter and layer counts that set a model's training FLOPs (see the module doc).

    ``params``/``layers``: N and the self-attention layers of a decoder-only or encoder
    model, or of the encoder of an encoder–decoder; ``decoder_params``/``decoder_layers``
    the decoder's (0 otherwise). ``width``: the attention width H·Q.
    """

    kind: str
    params: int
    layers: int
    width: int
    decoder_params: int = 0
    decoder_layers: int = 0
    #: self-attention layers (of ``layers``) that see only the last ``window`` keys (``alternating_local``)
    banded_layers: int = 0
    window: int = 0

    @property
    def total_params(self) -> int:
        """N of both sides (the ``N`` of ``6ND`` for an encoder–decoder whose sides see D tokens each)."""
        return self.params + self.decoder_params

    def per_token(self, seq_len: int) -> float:
        """FLOPs of one (encoder-side) token in a sequence of ``seq_len``: ``6N + 12·L·H·Q·T``; a banded
        layer counts ``min(W, T)`` keys instead of ``T``."""
        keys = (self.layers - self.banded_layers) * seq_len + self.banded_layers * min(self.window, seq_len)
        return 6.0 * self.params + 12.0 * self.width * keys

    def per_decoder_token(self, decoder_len: int, memory_len: int) -> float:
        """FLOPs of one decoder token: ``6·N_dec + 12·L_dec·H·Q·(T + S)`` (0 without a decoder)."""
        return 6.0 * self.decoder_params + 12.0 * self.decoder_layers * self.width * (decoder_len + memory_len)

    def batch(self, tokens: int, seq_len: int, decoder_tokens: int = 0, decoder_len: int = 0) -> float:
        """FLOPs (forward + backward) of ``tokens`` inputs in rows of ``seq_len`` (plus the decoder's)."""
        flops = tokens * self.per_token(seq_len)
        if decoder_tokens:
            flops += decoder_tokens * self.per_decoder_token(decoder_len, seq_len)
        return flops

    def batch_of(self, batch: dict) -> tuple[float, int]:
        """(FLOPs, input tokens) of a collated batch: ``input_ids`` [B, S], optional ``decoder_input_ids`` [B, T]."""
        ids = batch["input_ids"]
        dec = batch.get("decoder_input_ids")
        tokens = ids.numel()
        if dec is None:
            return self.batch(tokens, ids.shape[-1]), tokens
        return self.batch(tokens, ids.shape[-1], dec.numel(), dec.shape[-1]), tokens


# --------------------------------------------------------------------------- from a built model

def _is_moe(module: nn.Module) -> bool:
    # duck-typed: lmkit-moe's MoELayer (a plugin, so not imported here)
    return all(hasattr(module, a) for a in ("router", "experts", "top_k"))


def _active_params(module: nn.Module) -> int:
    """Parameters one token meets in ``module``: MoE layers count the router and ``top_k`` experts."""
    moe = [m for m in module.modules() if _is_moe(m)]
    skip = {id(p) for m in moe for p in m.parameters()}
    total = count_parameters(p for p in module.parameters() if id(p) not in skip)
    for m in moe:
        experts = m.experts
        per_expert = count_parameters(experts.parameters()) // max(1, int(getattr(experts, "num_experts", 1)))
        total += count_parameters(m.router.parameters()) + int(m.top_k) * per_expert
    return total


def _cross_kv(block: nn.Module) -> int:
    cross = getattr(block, "cross_attn", None)
    if cross is None:
        return 0
    return sum(count_parameters(getattr(cross, n).parameters()) for n in ("kv", "k", "v") if hasattr(cross, n))


def flops_from_model(model: nn.Module) -> FlopsModel:
    """Count N from a built architecture (before any sharding) through its contract methods.

    ``transformer_blocks()`` gives the logical layers (a shared block counts once per layer);
    blocks with a ``cross_attn`` are decoder blocks. Parameters outside the blocks count
    except the lookup tables (``embedding_modules()`` and every ``nn.Embedding``) and a
    ``pooler``; the output embedding counts once as the head.
    """
    blocks = list(model.transformer_blocks())
    lookup = {id(p) for m in model.embedding_modules() for p in m.parameters()}
    lookup |= {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    pooled = {id(p) for name, m in model.named_modules() if name.split(".")[-1] == "pooler" for p in m.parameters()}
    enc_extra = dec_extra = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or id(p) in lookup or id(p) in in_blocks or id(p) in pooled:
            continue
        seen.add(id(p))
        if any(part.startswith("decoder") for part in name.split(".")):
            dec_extra += p.numel()
        else:
            enc_extra += p.numel()
    head = model.output_embedding()
    head_params = head.numel() if id(head) in lookup else 0  # an untied head is already counted above
    width = int(model.d_model)
    decoder_blocks = [b for b in blocks if getattr(b, "cross_attn", None) is not None]
    if getattr(model, "kind", None) != "encoder_decoder" or not decoder_blocks:
        n = sum(_active_params(b) for b in blocks) + enc_extra + dec_extra + head_params
        windows = [w for w in (getattr(getattr(b, "attn", None), "window", None) for b in blocks) if w]
        return FlopsModel(getattr(model, "kind", "decoder"), n, len(blocks), width,
                          banded_layers=len(windows), window=max(windows, default=0))
    encoder_blocks = [b for b in blocks if getattr(b, "cross_attn", None) is None]
    kv = sum(_cross_kv(b) for b in decoder_blocks)
    n_enc = sum(_active_params(b) for b in encoder_blocks) + enc_extra + kv
    n_dec = sum(_active_params(b) for b in decoder_blocks) - kv + dec_extra + head_params
    return FlopsModel("encoder_decoder", n_enc, len(encoder_blocks), width, n_dec, len(decoder_blocks))


# --------------------------------------------------------------------------- from a config

def _linear(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _banded(cfg) -> dict:
    """``banded_layers``/``window`` of a decoder config with ``attention=alternating_local`` (odd layers banded)."""
    if getattr(cfg, "attention", "dense") != "alternating_local":
        return {}
    return {"banded_layers": int(cfg.n_layer) // 2, "window": int(cfg.attention_window)}


def _moe_fields(moe) -> tuple[int, int, int]:
    """(num_experts, every, top_k) of a ``model.moe`` section (MoEConfig, mapping or None; 0 experts = off)."""
    if moe is None:
        return 0, 1, 1
    get = moe.get if isinstance(moe, dict) else (lambda k, d=None: getattr(moe, k, d))
    return int(get("num_experts", 0) or 0), int(get("every", 2) or 1), int(get("top_k", 1) or 1)


def flops_from_config(cfg, moe=None, vocab_size: int | None = None) -> FlopsModel:
    """N counted analytically from a built-in architecture's config dataclass (no model is built).

    ``moe``: the ``model.moe`` section (lmkit-moe's MoEConfig or a mapping) or None;
    ``vocab_size`` replaces a ``cfg.vocab_size`` of None. Raises ConfigError for an
    architecture without an analytic count (use :func:`flops_from_model` on the built model).
    """
    name = getattr(cfg, "name", "")
    if name not in ANALYTIC_ARCHITECTURES:
        raise ConfigError(f"no analytic FLOPs count for architecture '{name}' (known: {', '.join(ANALYTIC_ARCHITECTURES)}); "
                          f"count a built model with lmkit.accounting.flops_from_model instead.")
    V = int(cfg.vocab_size or vocab_size or 0)
    if V <= 0:
        raise ConfigError("the vocabulary size is unknown: set model.vocab_size (e.g. model.vocab_size=50257).")
    d = int(cfg.d_model)
    experts, every, top_k = _moe_fields(moe)

    def mlp_of(i: int, dense: int) -> int:  # block i (0-based, encoder first) with MoE placement
        if experts and (i + 1) % every == 0:
            return top_k * dense + d * experts
        return dense

    if name == "gpt":
        ff, b = int(cfg.d_ff or 4 * d), bool(cfg.bias)
        ln = d * (2 if b else 1)
        attn = _linear(d, 3 * d, b) + _linear(d, d, b)
        mlp = _linear(d, ff, b) + _linear(ff, d, b)
        n = sum(2 * ln + attn + mlp_of(i, mlp) for i in range(cfg.n_layer)) + ln + V * d
        return FlopsModel("decoder", n, int(cfg.n_layer), d, **_banded(cfg))
    if name == "llama":
        kv = cfg.kv_heads * cfg.head_dim
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * cfg.ffn_size
        n = sum(2 * d + attn + mlp_of(i, mlp) for i in range(cfg.n_layer)) + d + V * d
        return FlopsModel("decoder", n, int(cfg.n_layer), d, **_banded(cfg))
    ff = int(cfg.d_ff or 4 * d)
    post_ln_attn = 4 * d * d + 4 * d
    post_ln_mlp = _linear(d, ff, True) + _linear(ff, d, True)
    if name in ("bert", "albert"):
        width_in = int(cfg.embedding_size) if name == "albert" else d
        n = sum(4 * d + post_ln_attn + mlp_of(i, post_ln_mlp) for i in range(cfg.n_layer))  # ALBERT: per use
        n += 2 * width_in  # embedding LayerNorm
        if name == "albert":
            n += _linear(width_in, d, True) + _linear(d, width_in, True) + 2 * width_in  # E->H in, H->E head
        else:
            n += 2 * d if cfg.pre_ln else 0
            n += _linear(d, d, True) + 2 * d if cfg.head_transform else 0
        n += V + V * width_in  # output bias and the tied output embedding
        return FlopsModel("encoder", n, int(cfg.n_layer), d)
    n_dec = int(cfg.n_layer if cfg.n_decoder_layer is None else cfg.n_decoder_layer)
    L = int(cfg.n_layer)
    if name == "t5":
        mlp = (3 if cfg.ffn == "gated-gelu" else 2) * d * ff
        enc = sum(2 * d + 4 * d * d + mlp_of(i, mlp) for i in range(L)) + d
        cross_q_out, cross_kv, norms = 2 * d * d, 2 * d * d, 3 * d
        dec = sum(norms + 4 * d * d + cross_q_out + mlp_of(L + i, mlp) for i in range(n_dec)) + d + V * d
    else:  # bart
        enc = sum(4 * d + post_ln_attn + mlp_of(i, post_ln_mlp) for i in range(L)) + 2 * d
        cross_q_out, cross_kv, norms = 2 * d * d + 2 * d, 2 * d * d + 2 * d, 6 * d
        dec = sum(norms + post_ln_attn + cross_q_out + mlp_of(L + i, post_ln_mlp) for i in range(n_dec)) + 2 * d + V * d
    return FlopsModel("encoder_decoder", enc + n_dec * cross_kv, L, d, dec, n_dec)


def six_nd(params: float, tokens: float) -> float:
    """Kaplan et al.'s ``C ≈ 6·N·D`` training compute (no attention term)."""
    return 6.0 * params * tokens

