"""Fixtures of the noise-function tests: a synthetic vocabulary and the benchmark's reference ports."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lmkit.noise import NoiseVocab

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def vocab() -> NoiseVocab:
    # specials at ids 1..10 so that id 0 is an ordinary token (HF #12755 dropped real 0s)
    return NoiseVocab.synthetic(32_100, num_sentinels=100, first_special=1)


@pytest.fixture(scope="session")
def bench():
    """tools/bench_noise.py, whose per-example reference ports the tests compare against."""
    spec = importlib.util.spec_from_file_location("bench_noise", REPO / "tools" / "bench_noise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_noise"] = module
    spec.loader.exec_module(module)
    return module
