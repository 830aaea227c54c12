"""The tokenizer interface every lmkit tokenizer implements.

All tokenizers carry the same named special tokens so that any objective can run with any
tokenizer. T5-style sentinels, when requested, occupy the top ``num_sentinels`` ids of the
vocabulary and count down: sentinel 0 is ``vocab_size - 1``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "[CLS]", "[SEP]", "[MASK]", "[NLU]", "[NLG]", "[S2S]",
)

#: Largest vocabulary (tokenizer.vocab_size, model.vocab_size, sentinels included) lmkit accepts:
#: 2**21 ids. The largest vocabularies in use are about 1M tokens; beyond that a typo (1e9)
#: would make the tokenizer trainer and the embedding allocate tens of GB before failing.
MAX_VOCAB_SIZE = 2 ** 21
#: Smallest vocabulary of a trained (bpe/wordpiece/unigram) tokenizer: byte-level BPE starts
#: from the 256 byte alphabet plus the special tokens, so anything smaller learns no merge
#: (and HF silently returns 266 tokens instead of the size asked for).
MIN_TRAINED_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1


class Tokenizer(ABC):
    """Maps text to token ids and back, and describes its vocabulary.

    Subclasses set ``vocab_size`` (sentinels included) and ``num_sentinels``, and implement
    the abstract methods. Ids are plain Python ints / int64 tensors.
    """

    vocab_size: int
    num_sentinels: int = 0

    # -- text <-> ids ---------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; subclasses override with a parallel version."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of ``ids``; special tokens are rendered by name."""

    # -- vocabulary facts -----------------------------------------------------------
    @abstractmethod
    def special_id(self, name: str) -> int:
        """Id of a special token named in :data:`SPECIAL_TOKENS`."""

    @property
    def pad_id(self) -> int:
        return self.special_id("<pad>")

    @property
    def eos_id(self) -> int:
        return self.special_id("<eos>")

    @property
    def bos_id(self) -> int:
        return self.special_id("<bos>")

    @property
    def cls_id(self) -> int:
        return self.special_id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self.special_id("[SEP]")

    @property
    def mask_id(self) -> int:
        return self.special_id("[MASK]")

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``: ``vocab_size - 1 - i`` (T5's descending convention)."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range: tokenizer has {self.num_sentinels}")
        return self.vocab_size - 1 - i

    @abstractmethod
    def special_table(self) -> np.ndarray:
        """Bool array [vocab_size]: True for special tokens and sentinels."""

    def regular_ids(self) -> torch.Tensor:
        """Ids of ordinary (non-special) tokens, for sampling random replacements."""
        return torch.from_numpy(np.flatnonzero(~self.special_table())).long()

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """Int array [vocab_size]: UTF-8 bytes each token stands for (0 for specials).

        Used for bits-per-byte, which is comparable across tokenizers.
        """

    @abstractmethod
    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like ``ids``: True where a token begins a new word.

        Vectorized over any shape (last dim is the sequence). Special tokens are word
        starts of their own. Whole-word masking and span objectives build on this.
        """

    # -- persistence ----------------------------------------------------------------
    @abstractmethod
    def save(self, path) -> None:
        """Write the tokenizer to a JSON file at ``path``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short string that changes whenever the id mapping changes (for caches)."""
