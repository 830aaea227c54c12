"""Factories of the built-in tokenizers (registered by :mod:`lmkit.builtins`)."""
from __future__ import annotations

from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import load_or_train


def build_byte(cfg, source, cache_dir):
    return ByteTokenizer(num_sentinels=cfg.num_sentinels)


def _trained(kind):
    def build(cfg, source, cache_dir):
        return load_or_train(kind, source.documents, source.fingerprint(), cache_dir, cfg.vocab_size,
                             cfg.num_sentinels, cfg.min_frequency)

    build.__doc__ = f"{kind} tokenizer trained on the corpus, cached."
    return build


build_bpe = _trained("bpe")
build_wordpiece = _trained("wordpiece")
build_unigram = _trained("unigram")
