"""Fixtures of the lmkit-fsdp tests (helpers live in fsdp_helpers.py, a unique module name)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fsdp_helpers import Launcher

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("lmkit-cache")
    os.environ["LMKIT_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def launcher(tmp_path_factory, cache_dir) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("fsdp-runs"), cache_dir)
