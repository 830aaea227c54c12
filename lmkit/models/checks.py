"""Config checks shared by the architectures' config dataclasses (called from their ``__post_init__``).

A bad size or option fails when the config is validated, before anything is built, with one
message naming the ``model.*`` key and a fix (instead of a ValueError from deep inside torch
once the run directory exists).
"""
from __future__ import annotations

from lmkit.config.checks import check_choice, check_int, check_positive, check_probability
from lmkit.errors import ConfigError

#: activations of the MLPs and heads (:class:`lmkit.models.layers.MLP`)
ACTIVATIONS = ("gelu", "gelu_exact", "relu")


def _divisors_near(n: int, around: int, count: int = 3) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - around), d))[:count])


def check_heads(d_model: int, n_head: int, key: str = "model") -> None:
    """``d_model`` splits evenly over ``n_head`` heads."""
    if d_model % n_head:
        near = _divisors_near(d_model, n_head)
        raise ConfigError(
            f"{key}.d_model={d_model} is not divisible by {key}.n_head={n_head}: each attention head gets "
            f"d_model / n_head dimensions. Use {key}.n_head={' or '.join(map(str, near))} (divisors of {d_model} "
            f"near {n_head}), or a d_model that is a multiple of {n_head}."
        )


def check_architecture(cfg, key: str = "model", init_schemes=("normal", "xavier")) -> None:
    """The sizes and options every lmkit transformer config has (those it has: fields are looked up)."""
    from lmkit.tokenizers.base import MAX_VOCAB_SIZE

    check_int(f"{key}.vocab_size", cfg.vocab_size, minimum=1, maximum=MAX_VOCAB_SIZE, optional=True,
              hint=" (null = the tokenizer's vocabulary)")
    check_int(f"{key}.max_seq_len", cfg.max_seq_len, minimum=1, hint=" (the longest sequence the model takes)")
    check_int(f"{key}.n_layer", cfg.n_layer, minimum=1)
    if hasattr(cfg, "n_decoder_layer"):
        check_int(f"{key}.n_decoder_layer", cfg.n_decoder_layer, minimum=1, optional=True,
                  hint=" (null = as many as model.n_layer)")
    check_int(f"{key}.n_head", cfg.n_head, minimum=1)
    check_int(f"{key}.d_model", cfg.d_model, minimum=1)
    check_heads(cfg.d_model, cfg.n_head, key)
    check_int(f"{key}.d_ff", cfg.d_ff, minimum=1, optional=True, hint=" (null = 4 * d_model)")
    check_probability(f"{key}.dropout", cfg.dropout)
    if hasattr(cfg, "type_vocab_size"):
        check_int(f"{key}.type_vocab_size", cfg.type_vocab_size, minimum=0, hint=" (0 = no segment embeddings)")
    if hasattr(cfg, "layer_norm_eps"):
        check_positive(f"{key}.layer_norm_eps", cfg.layer_norm_eps)
    if hasattr(cfg, "activation"):
        check_choice(f"{key}.activation", cfg.activation, ACTIVATIONS)
    check_choice(f"{key}.init", cfg.init, init_schemes)
    check_positive(f"{key}.init_std", cfg.init_std, " (the standard deviation of the initial weights, e.g. 0.02)")
    if hasattr(cfg, "attention"):
        from lmkit.models.local_attention import check_attention

        check_attention(cfg, key)


def post_init_base(cfg, cls) -> None:
    """Run the ``__post_init__`` of ``cls``'s base classes, if one has any (the shared config contract may add one)."""
    parent = super(cls, cfg).__post_init__ if hasattr(super(cls, cfg), "__post_init__") else None
    if parent is not None:
        parent()
