"""BPE, WordPiece and Unigram tokenizers trained on the corpus with HF ``tokenizers``.

Trained once, cached under the cache directory by (kind, vocab size, corpus fingerprint)
and reused by later runs. Specials take ids 0..9, sentinels the top of the vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmkit.tokenizers.base import SPECIAL_TOKENS, Tokenizer

TRAINED_KINDS = ("bpe", "wordpiece", "unigram")


def _sentinel_names(n: int) -> list[str]:
    # added in ascending id order, so <extra_id_0> lands on the last (highest) id
    return [f"<extra_id_{i}>" for i in reversed(range(n))]


def train_hf_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a fresh HF tokenizer of ``kind`` on ``texts``."""
    specials = list(SPECIAL_TOKENS)
    if kind == "bpe":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        tok = HFTokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials)
    elif kind == "unigram":
        tok = HFTokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {TRAINED_KINDS}")
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class TrainedTokenizer(Tokenizer):
    """An lmkit :class:`Tokenizer` over a trained HF tokenizer."""

    def __init__(self, hf: HFTokenizer, kind: str, num_sentinels: int = 0):
        self.kind = kind
        self.hf = hf
        existing = sum(1 for name in _sentinel_names(num_sentinels) if hf.token_to_id(name) is not None)
        if existing < num_sentinels:
            hf.add_special_tokens(_sentinel_names(num_sentinels))
        self.num_sentinels = num_sentinels
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        if num_sentinels and hf.token_to_id("<extra_id_0>") != self.vocab_size - 1:
            raise ValueError("sentinel tokens are not at the top of the vocabulary; retrain the tokenizer")
        self._special = {name: hf.token_to_id(name) for name in SPECIAL_TOKENS}
        vocab = [hf.id_to_token(i) or "" for i in range(self.vocab_size)]
        special = self.special_table()
        if kind == "bpe":
            starts = np.array([t.startswith("Ġ") for t in vocab])
            byte_len = np.array([len(t) for t in vocab])  # one byte-level char per byte
        elif kind == "wordpiece":
            starts = np.array([not t.startswith("##") for t in vocab])
            byte_len = np.array([len(t.removeprefix("##").encode()) + (0 if t.startswith("##") else 1) for t in vocab])
        else:
            starts = np.array([t.startswith("▁") for t in vocab])
            byte_len = np.array([len(t.replace("▁", " ").encode()) for t in vocab])
        byte_len[special] = 0
        self._starts = torch.from_numpy(starts | special)
        self._special_t = torch.from_numpy(special)
        self._byte_len = byte_len.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_id(self, name: str) -> int:
        return self._special[name]

    def special_table(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        for name in list(SPECIAL_TOKENS) + _sentinel_names(self.num_sentinels):
            i = self.hf.token_to_id(name)
            if i is not None:
                table[i] = True
        return table

    def token_byte_lengths(self) -> np.ndarray:
        return self._byte_len

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        starts = self._starts.to(ids.device)[ids]
        special = self._special_t.to(ids.device)[ids]
        after_special = torch.zeros_like(starts)
        after_special[..., 1:] = special[..., :-1]
        starts[..., 0] = True
        return starts | after_special

    def save(self, path) -> None:
        self.hf.save(str(path))

    def fingerprint(self) -> str:
        # the id mapping, not the serialized JSON (its float formatting is not stable across save/load)
        vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(f"{self.kind}:{vocab}".encode()).hexdigest()[:16]


def load_or_train(kind: str, texts: Callable[[], Iterable[str]], corpus_fingerprint: str, cache_dir: Path,
                  vocab_size: int, num_sentinels: int, min_frequency: int = 2) -> TrainedTokenizer:
    """The cached tokenizer for this corpus and settings, training it on first use."""
    corpus_key = hashlib.sha256(corpus_fingerprint.encode()).hexdigest()[:16]  # fingerprints hold any characters
    path = Path(cache_dir) / "tokenizers" / f"{kind}-{vocab_size}-{min_frequency}-{corpus_key}.json"
    hf = None
    if path.exists():
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # a damaged cache entry (disk, an interrupted copy): it is only a cache
            from lmkit.plugins import warn

            warn(f"the cached tokenizer {path} is damaged ({type(e).__name__}); training it again")
    if hf is None:
        hf = train_hf_tokenizer(kind, texts(), vocab_size, min_frequency)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        hf.save(str(tmp))
        os.replace(tmp, path)
    return TrainedTokenizer(hf, kind, num_sentinels)


def load_tokenizer_file(path) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save` (a run directory's tokenizer.json)."""
    from lmkit.tokenizers.byte import ByteTokenizer

    text = Path(path).read_text()
    data = json.loads(text)
    if data.get("lmkit_tokenizer") == "byte":
        return ByteTokenizer(num_sentinels=int(data.get("num_sentinels", 0)))
    if data.get("lmkit_tokenizer") == "hf_dir":  # a Hugging Face model's own tokenizer (init_from=HF_DIR)
        from lmkit.interop.tokenizer import HFDirTokenizer

        return HFDirTokenizer.from_saved(data)
    hf = HFTokenizer.from_str(text)
    kind = type(hf.model).__name__.lower()
    kind = {"bpe": "bpe", "wordpiece": "wordpiece", "unigram": "unigram"}[kind]
    n_sentinels = sum(1 for name in hf.get_vocab() if name.startswith("<extra_id_"))
    return TrainedTokenizer(hf, kind, n_sentinels)
