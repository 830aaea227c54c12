"""Pieces shared by the denoising objectives: config checks, framing, seq2seq batches, tables."""
from __future__ import annotations

import numpy as np
import torch

from lmkit.errors import ConfigError, did_you_mean
from lmkit.noise import NoiseVocab
from lmkit.noise import _common as noise_checks
from lmkit.objectives.base import IGNORE_INDEX, LossOutput
from lmkit.tokenizers.base import SPECIAL_TOKENS

MLM_MODES = ("exact", "roberta", "bernoulli")


# -- config checks (raise ConfigError naming the key, so a bad value fails before training) ----------
def check_open_unit(key: str, value, hint: str = "") -> None:
    noise_checks.check_open_unit(f"objective.{key}", value, hint, error=ConfigError)


def check_unit(key: str, value, below_one: bool = False) -> None:
    noise_checks.check_unit(f"objective.{key}", value, below_one, error=ConfigError)


def check_span_length(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= float(value) < float("inf"):
        raise ConfigError(f"objective.{key} must be a number >= 1 (tokens or words per span), got {value!r}")


def check_fracs(mask_token_frac: float, random_token_frac: float) -> None:
    noise_checks.check_fracs(mask_token_frac, random_token_frac, prefix="objective.", error=ConfigError)


def check_mlm_fields(cfg) -> None:
    """The masking options shared by mlm, nsp and sop."""
    check_open_unit("mask_prob", cfg.mask_prob, " (the share of tokens to predict, e.g. 0.15)")
    if cfg.mode not in MLM_MODES:
        raise ConfigError(f"objective.mode must be one of {', '.join(MLM_MODES)}, got {cfg.mode!r}."
                          f"{did_you_mean(str(cfg.mode), MLM_MODES)}".rstrip("."))
    if cfg.max_predictions is not None and cfg.max_predictions < 1:
        raise ConfigError(f"objective.max_predictions must be >= 1 or null (no cap), got {cfg.max_predictions}")
    check_fracs(cfg.mask_token_frac, cfg.random_token_frac)


def check_special_name(key: str, value: str) -> None:
    if value not in SPECIAL_TOKENS:
        raise ConfigError(f"objective.{key} must name a special token ({', '.join(SPECIAL_TOKENS)}), got {value!r}."
                          f"{did_you_mean(str(value), SPECIAL_TOKENS)}".rstrip("."))


def too_short(objective: str, seq_len: int, need: int, what: str) -> ConfigError:
    return ConfigError(
        f"data.seq_len={seq_len} is too short for objective '{objective}': it needs at least {need} ({what}). "
        f"Raise data.seq_len."
    )


# -- model checks -----------------------------------------------------------------------------------
def require_method(objective: str, model, method: str, why: str) -> None:
    if not callable(getattr(model, method, None)):
        raise ConfigError(
            f"objective '{objective}' needs a model with {method}() ({why}); {type(model).__name__} has none. "
            f"Choose an architecture that provides it (e.g. model=bert_tiny)."
        )


# -- batches ----------------------------------------------------------------------------------------
def frame(blocks: torch.Tensor, first_id: int, last_id: int) -> torch.Tensor:
    """``[first] block [last]`` for every row of ``blocks`` [B, n] -> [B, n + 2]."""
    B = blocks.shape[0]
    first = torch.full((B, 1), first_id, dtype=blocks.dtype)
    last = torch.full((B, 1), last_id, dtype=blocks.dtype)
    return torch.cat([first, blocks, last], dim=1)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs (teacher forcing): ``start`` then ``labels[:-1]``; ignored labels become pad."""
    dec = torch.full_like(labels, pad_id)
    dec[:, 0] = start_id
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE_INDEX, pad_id)


def add_decoder_inputs(batch: dict[str, torch.Tensor], start_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Add ``decoder_input_ids`` and ``decoder_padding_mask`` (targets are compact: real, then -100)."""
    labels = batch["labels"]
    batch["decoder_input_ids"] = shift_right(labels, start_id, pad_id)
    batch["decoder_padding_mask"] = labels != IGNORE_INDEX
    return batch


def mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when every token is real (lets attention take its unmasked fast path)."""
    return None if mask is None or bool(mask.all()) else mask


def seq2seq_loss(objective, model, batch) -> LossOutput:
    """Teacher-forced encoder–decoder cross-entropy over every target token (sentinels and EOS included)."""
    hidden = model(batch["input_ids"], padding_mask=mask_or_none(batch.get("padding_mask")),
                   decoder_input_ids=batch["decoder_input_ids"],
                   decoder_padding_mask=mask_or_none(batch.get("decoder_padding_mask")))
    return objective.lm_head_nll(model, hidden, batch["labels"], objective.cfg.chunked_ce)


# -- vocabulary tables ------------------------------------------------------------------------------
def noise_vocab(tokenizer) -> NoiseVocab:
    return NoiseVocab.from_tokenizer(tokenizer)


_PUNCT = (".", "!", "?")


def sentence_end_tables(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ends_with_punct, ends_with_space, starts_with_space)``: bool [V] each.

    A token ends a sentence when its text (trailing whitespace stripped) ends with '.', '!'
    or '?' and whitespace follows: its own trailing whitespace, or the next token's leading
    whitespace. The byte tokenizer's tables come from the byte values; a trained tokenizer's
    from decoding each vocabulary entry in context (after a reference token, so that
    decoders that drop a leading space at the start of a text keep it).
    """
    from lmkit.tokenizers.byte import ByteTokenizer

    V = tokenizer.vocab_size
    special = np.asarray(tokenizer.special_table(), dtype=bool)
    punct = np.zeros(V, dtype=bool)
    ends_ws = np.zeros(V, dtype=bool)
    starts_ws = np.zeros(V, dtype=bool)
    if isinstance(tokenizer, ByteTokenizer):
        punct[[ord(c) for c in _PUNCT]] = True
        starts_ws[[9, 10, 11, 12, 13, 32]] = True
    else:
        ref = tokenizer.encode("a")[:1]
        base = tokenizer.decode(ref) if ref else ""
        for i in range(V):
            if special[i]:
                continue
            text = tokenizer.decode(ref + [i]) if ref else tokenizer.decode([i])
            text = text[len(base):] if text.startswith(base) else text
            stripped = text.rstrip()
            punct[i] = stripped.endswith(_PUNCT)
            ends_ws[i] = bool(text) and text[-1].isspace() and bool(stripped)
            starts_ws[i] = bool(text) and text[0].isspace()
    punct &= ~special
    return torch.from_numpy(punct), torch.from_numpy(ends_ws & punct), torch.from_numpy(starts_ws & ~special)


def sentence_ends(ids: torch.Tensor, tables) -> torch.Tensor:
    """Bool like ``ids``: True on a token that ends a sentence (see :func:`sentence_end_tables`)."""
    punct, ends_ws, starts_ws = tables
    is_end = punct[ids]
    followed = torch.zeros_like(is_end)
    followed[:, :-1] = starts_ws[ids[:, 1:]]
    return is_end & (ends_ws[ids] | followed)
