"""Fixtures of the lmkit-pipeline tests (CPU only, gloo).

Multi-process runs are ``torchrun`` subprocesses killed after a timeout, so a collective that
never completes fails the test instead of hanging it. Every run is the same tiny GPT
(4 blocks, d_model 32) on the built-in corpus.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores shared by the test processes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pp_common import REF_STEPS, TINY, run_reference  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lmkit-cache")
    os.environ["LMKIT_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "offline")
    yield cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process run every pipeline run is compared with (8 rows per step, 20 steps)."""
    run_dir = tmp_path_factory.mktemp("reference")
    summary = run_reference(run_dir)
    return run_dir, summary


@pytest.fixture
def tiny():
    return list(TINY)


__all__ = ["REF_STEPS"]
