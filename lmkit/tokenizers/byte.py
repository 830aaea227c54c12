"""Byte-level tokenizer: one id per UTF-8 byte, needs no training."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from lmkit.tokenizers.base import SPECIAL_TOKENS, Tokenizer

_WHITESPACE = (9, 10, 11, 12, 13, 32)


class ByteTokenizer(Tokenizer):
    """Ids 0–255 are bytes, then the named specials, then ``num_sentinels`` sentinels on top."""

    def __init__(self, num_sentinels: int = 0):
        self.num_sentinels = num_sentinels
        self._special = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS) + num_sentinels
        self._is_space = torch.zeros(self.vocab_size, dtype=torch.bool)
        self._is_space[list(_WHITESPACE)] = True
        self._is_special = torch.from_numpy(self.special_table())

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for caching: the ids of ``text`` as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        names = {v: k for k, v in self._special.items()}
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(names.get(i, f"<extra_id_{self.vocab_size - 1 - i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def special_id(self, name: str) -> int:
        return self._special[name]

    def special_table(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        table[256:] = True
        return table

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:256] = 1
        return lengths

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        space = self._is_space.to(ids.device)[ids]
        special = self._is_special.to(ids.device)[ids]
        prev_boundary = torch.ones_like(space)
        prev_boundary[..., 1:] = space[..., :-1] | special[..., :-1]
        return special | (~space & prev_boundary)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump({"lmkit_tokenizer": "byte", "num_sentinels": self.num_sentinels}, f)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"byte:{self.num_sentinels}:{SPECIAL_TOKENS}".encode()).hexdigest()[:16]
