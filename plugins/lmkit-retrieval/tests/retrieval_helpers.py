"""Shared fixtures of the lmkit-retrieval tests (no conftest.py, so that this directory never shadows another
suite's ``conftest`` module when collected together with it): import them into a test module to use them.

* ``encoder_run``: a tiny lmkit MLM run (1 layer, d_model 32, 2 steps) trained once per session;
* ``encoder``: its :class:`~lmkit_retrieval.encoder.ChunkEncoder`;
* ``stream``: the first ``STREAM_TOKENS`` tokens of the built-in corpus's train split, one document per
  ``\\n\\n``-separated speech (about 90 documents), with its data overrides.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))  # the core suite's helpers, as lmkit-moe
from lmkit_test_utils import one_error_line  # noqa: E402,F401  (re-exported for this plugin's tests)

CHUNK = 16
STREAM_TOKENS = 40 * 64 + 37  # 162 chunks of 16 plus a 5-token tail

ENCODER_OVERRIDES = ["+objective=mlm", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.seq_len=64",
                     "data.batch_size=4", "trainer.max_steps=2", "logger=none", "callbacks=[]",
                     "trainer.progress_bar=false", "trainer.val_batches=1", "trainer.val_check_interval=2"]


def data_overrides(cache_dir) -> list[str]:
    return ['data.doc_separator="\n\n"', f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def encoder_run(tmp_path_factory):
    import lmkit.api

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retrieval-encoder")
    lmkit.api.run(ENCODER_OVERRIDES + [f"data.cache_dir={root / 'cache'}"], root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def encoder(encoder_run):
    from lmkit_retrieval.encoder import ChunkEncoder

    return ChunkEncoder.load(encoder_run)


@pytest.fixture(scope="session")
def stream(encoder, tmp_path_factory):
    """(tokens, data overrides)."""
    from lmkit_retrieval.command import corpus_stream

    overrides = data_overrides(tmp_path_factory.mktemp("retrieval-cache"))
    tokens, _ = corpus_stream(encoder.tokenizer, overrides, "train", STREAM_TOKENS)
    return np.asarray(tokens), overrides


def reference_doc_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Document of each token by a plain walk over the stream: an <eos> ends (and belongs to) its document."""
    out, doc = np.empty(len(tokens), dtype=np.int64), 0
    for i, t in enumerate(tokens.tolist()):
        out[i] = doc
        doc += t == eos_id
    return out
