"""Factories of the built-in tokenizers (registered by :mod:`lmkit.builtins`)."""
from __future__ import annotations

from pathlib import Path

from lmkit.errors import ConfigError
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import load_or_train


def build_byte(cfg, source, cache_dir):
    return ByteTokenizer(num_sentinels=cfg.num_sentinels)


def _trained(kind):
    def build(cfg, source, cache_dir):
        from lmkit.data.cache import cache_writes

        with cache_writes(Path(cache_dir) / "tokenizers"):
            try:
                tokenizer = load_or_train(kind, source.documents, source.fingerprint(), cache_dir, cfg.vocab_size,
                                          cfg.num_sentinels, cfg.min_frequency)
            except Exception as e:  # HF's Unigram trainer raises a plain Exception for a too small vocabulary
                if "not large enough to contain all chars" not in str(e):
                    raise
                raise ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus: a {kind} "
                                  f"vocabulary holds every character of the corpus plus the special tokens. Raise "
                                  f"tokenizer.vocab_size.") from None
        learned = tokenizer.vocab_size - tokenizer.num_sentinels
        if learned > cfg.vocab_size:  # the trainer kept the whole alphabet: more tokens than asked for
            raise ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for this corpus: its {kind} "
                              f"alphabet and the special tokens alone take {learned} ids. Use "
                              f"tokenizer.vocab_size={learned} or more.")
        return tokenizer

    build.__doc__ = f"{kind} tokenizer trained on the corpus, cached."
    return build


build_bpe = _trained("bpe")
build_wordpiece = _trained("wordpiece")
build_unigram = _trained("unigram")
