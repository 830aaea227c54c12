"""NoiseVocab: built from an lmkit Tokenizer, validated, picklable."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lmkit.noise import NoiseVocab
from lmkit.tokenizers.base import SPECIAL_TOKENS, Tokenizer


class TinyTokenizer(Tokenizer):
    """Characters 'a'..'z' after the specials, then 4 sentinels at the top."""

    num_sentinels = 4

    def __init__(self):
        self.specials = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = len(SPECIAL_TOKENS) + 26 + self.num_sentinels

    def encode(self, text):
        return [len(SPECIAL_TOKENS) + ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i - len(SPECIAL_TOKENS)) for i in ids)

    def special_id(self, name):
        return self.specials[name]

    def special_table(self):
        table = np.zeros(self.vocab_size, dtype=bool)
        table[: len(SPECIAL_TOKENS)] = True
        table[self.vocab_size - self.num_sentinels:] = True
        return table

    def token_byte_lengths(self):
        return (~self.special_table()).astype(np.int64)

    def word_starts(self, ids):
        return torch.ones_like(ids, dtype=torch.bool)

    def save(self, path):
        raise NotImplementedError

    def fingerprint(self):
        return "tiny"


def test_from_tokenizer():
    tok = TinyTokenizer()
    v = NoiseVocab.from_tokenizer(tok)
    assert v.vocab_size == 40 and v.num_sentinels == 4
    assert (v.pad_id, v.eos_id, v.bos_id, v.cls_id, v.sep_id, v.mask_id) == (0, 1, 2, 4, 5, 6)
    assert (v.nlu_id, v.nlg_id, v.s2s_id) == (7, 8, 9)
    assert v.sentinel_id(0) == 39 == tok.sentinel_id(0) and v.first_sentinel_id == 36
    assert torch.equal(v.regular_ids, torch.arange(10, 36))
    assert v.special_table.dtype == torch.bool and int(v.special_table.sum()) == 14
    again = pickle.loads(pickle.dumps(v))  # collators run in DataLoader workers
    assert torch.equal(again.regular_ids, v.regular_ids) and again.mask_id == v.mask_id


def test_validation():
    v = NoiseVocab.synthetic(100, num_sentinels=5)
    with pytest.raises(ValueError, match="special_table has shape"):
        NoiseVocab(**{**v.__dict__, "special_table": torch.zeros(10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="regular_ids must be a non-empty"):
        NoiseVocab(**{**v.__dict__, "regular_ids": torch.zeros(0, dtype=torch.long)})
    with pytest.raises(ValueError, match="mask_id=100 is outside the vocabulary"):
        NoiseVocab(**{**v.__dict__, "mask_id": 100})
    with pytest.raises(ValueError, match="too small"):
        NoiseVocab.synthetic(12, num_sentinels=5)
    with pytest.raises(IndexError):
        v.sentinel_id(5)
