"""Special-token facts that the noise functions need, detached from any tokenizer object.

The noise functions run in DataLoader workers, so they take this small, picklable record
instead of a tokenizer: ids of the named special tokens, the sentinel convention (sentinel
``i`` is ``vocab_size - 1 - i``, counting down like T5), the ids that may be drawn as random
replacements, and a table marking every special id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: order of the named special tokens (the same as :data:`lmkit.tokenizers.base.SPECIAL_TOKENS`)
SPECIAL_NAMES: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "[CLS]", "[SEP]", "[MASK]", "[NLU]", "[NLG]", "[S2S]",
)


@dataclass(frozen=True, eq=False)
class NoiseVocab:
    """What a noise function must know about the vocabulary.

    ``special_table`` is a bool tensor [vocab_size], True for every special token and every
    sentinel; special tokens are never selected for noise. ``regular_ids`` (int64) are the
    ids random replacements are drawn from. ``nlu_id``/``nlg_id``/``s2s_id`` are UL2's mode
    tokens ([NLU], [NLG], [S2S]); None where the vocabulary has none.
    """

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    num_sentinels: int
    regular_ids: torch.Tensor
    special_table: torch.Tensor
    nlu_id: int | None = None
    nlg_id: int | None = None
    s2s_id: int | None = None

    def __post_init__(self):
        table = torch.as_tensor(self.special_table, dtype=torch.bool)
        regular = torch.as_tensor(self.regular_ids, dtype=torch.long)
        object.__setattr__(self, "special_table", table)
        object.__setattr__(self, "regular_ids", regular)
        if table.shape != (self.vocab_size,):
            raise ValueError(
                f"special_table has shape {tuple(table.shape)} but vocab_size is {self.vocab_size}; "
                "it must be a bool tensor with one entry per vocabulary id"
            )
        if regular.ndim != 1 or regular.numel() == 0:
            raise ValueError("regular_ids must be a non-empty 1-D tensor of ordinary token ids")
        if not 0 <= self.num_sentinels < self.vocab_size:
            raise ValueError(f"num_sentinels={self.num_sentinels} must be in [0, vocab_size={self.vocab_size})")
        for name in ("pad_id", "eos_id", "bos_id", "cls_id", "sep_id", "mask_id", "nlu_id", "nlg_id", "s2s_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # -- sentinels ----------------------------------------------------------------------
    def sentinel_id(self, i: int) -> int:
        """Id of sentinel ``i`` (``<extra_id_i>``): ``vocab_size - 1 - i``."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range: the vocabulary has {self.num_sentinels} sentinels")
        return self.vocab_size - 1 - i

    @property
    def first_sentinel_id(self) -> int:
        """Smallest sentinel id (``vocab_size - num_sentinels``); sentinels fill the ids above."""
        return self.vocab_size - self.num_sentinels

    # -- builders -----------------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tok) -> "NoiseVocab":
        """Build from an lmkit :class:`~lmkit.tokenizers.base.Tokenizer`."""

        def optional(name: str) -> int | None:
            try:
                return int(tok.special_id(name))
            except (KeyError, ValueError, IndexError):
                return None

        return cls(
            vocab_size=int(tok.vocab_size),
            pad_id=int(tok.pad_id),
            eos_id=int(tok.eos_id),
            bos_id=int(tok.bos_id),
            cls_id=int(tok.cls_id),
            sep_id=int(tok.sep_id),
            mask_id=int(tok.mask_id),
            num_sentinels=int(getattr(tok, "num_sentinels", 0)),
            regular_ids=tok.regular_ids(),
            special_table=torch.from_numpy(np.asarray(tok.special_table(), dtype=bool)),
            nlu_id=optional("[NLU]"),
            nlg_id=optional("[NLG]"),
            s2s_id=optional("[S2S]"),
        )

    @classmethod
    def synthetic(cls, vocab_size: int = 32_000, num_sentinels: int = 100, first_special: int = 0) -> "NoiseVocab":
        """A vocabulary without a tokenizer, for tests and benchmarks.

        The ten named special tokens take ids ``first_special .. first_special + 9`` (in the
        order of :data:`SPECIAL_NAMES`), sentinels the top ``num_sentinels`` ids; every other
        id is regular.
        """
        if vocab_size < first_special + len(SPECIAL_NAMES) + num_sentinels + 1:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for {len(SPECIAL_NAMES)} special tokens from id "
                f"{first_special}, {num_sentinels} sentinels and at least one regular token"
            )
        ids = {name: first_special + i for i, name in enumerate(SPECIAL_NAMES)}
        table = torch.zeros(vocab_size, dtype=torch.bool)
        table[first_special:first_special + len(SPECIAL_NAMES)] = True
        if num_sentinels:
            table[vocab_size - num_sentinels:] = True
        return cls(
            vocab_size=vocab_size,
            pad_id=ids["<pad>"], eos_id=ids["<eos>"], bos_id=ids["<bos>"], cls_id=ids["[CLS]"],
            sep_id=ids["[SEP]"], mask_id=ids["[MASK]"], num_sentinels=num_sentinels,
            regular_ids=torch.nonzero(~table).flatten(), special_table=table,
            nlu_id=ids["[NLU]"], nlg_id=ids["[NLG]"], s2s_id=ids["[S2S]"],
        )
