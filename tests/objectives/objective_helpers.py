"""Shared by the objective tests: real text blocks, tiny models, and tiny run overrides."""
from __future__ import annotations

import functools

import numpy as np
import torch

from lmkit.data.sources import BUILTIN_CORPORA
from lmkit.tokenizers.byte import ByteTokenizer

# A 1-layer model of the objective's default architecture on 64-token windows.
RUN = [
    "model.n_layer=1", "model.n_head=2", "model.d_model=64", "data.seq_len=64", "data.batch_size=8",
    "trainer.max_steps=25", "trainer.val_check_interval=25", "trainer.val_batches=2",
    "trainer.checkpoint_every_n_steps=1000", "trainer.progress_bar=false", "logger=none",
    "scheduler.warmup_steps=2", "callbacks=[]",
]


@functools.lru_cache(maxsize=1)
def corpus_bytes() -> np.ndarray:
    text = BUILTIN_CORPORA["tinyshakespeare"].read_text()[:50_000]
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def text_blocks(n_rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n_rows`` windows of ``length`` byte tokens from random places of the built-in corpus."""
    data = corpus_bytes()
    starts = np.random.default_rng(seed).integers(0, len(data) - length, n_rows)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]))


def byte_tokenizer(num_sentinels: int = 64) -> ByteTokenizer:
    return ByteTokenizer(num_sentinels=num_sentinels)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model(name: str, vocab_size: int, **kw):
    from lmkit.models.albert import ALBERT, ALBERTConfig
    from lmkit.models.bart import BART, BARTConfig
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.t5 import T5, T5Config

    size = dict(n_layer=1, n_head=2, d_model=32, max_seq_len=160, vocab_size=vocab_size)
    classes = {"bert": (BERT, BERTConfig), "albert": (ALBERT, ALBERTConfig), "t5": (T5, T5Config),
               "bart": (BART, BARTConfig), "gpt": (GPT, GPTConfig)}
    cls, cfg = classes[name]
    torch.manual_seed(0)
    return cls(cfg(**{**size, **kw}))
