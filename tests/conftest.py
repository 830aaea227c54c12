"""Shared fixtures: an isolated cache, tiny run overrides, and a fake installed plugin."""
from __future__ import annotations

import os
import sys

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; tests run faster without thread contention

from lmkit_test_utils import REPO, TINY, write_fake_plugin  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lmkit-cache")
    os.environ["LMKIT_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield cache


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """Factory installing fake plugins on sys.path (and PYTHONPATH for subprocesses)."""
    roots = []

    def install(dist, module, source, version="0.1.0"):
        root = write_fake_plugin(tmp_path / "site" / dist, dist, module, source, version)
        monkeypatch.syspath_prepend(str(root))
        roots.append(str(root))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(roots + [os.environ.get("PYTHONPATH", "")]))
        return root

    yield install
    for name in list(sys.modules):
        if name.startswith("lmkit_test_"):
            del sys.modules[name]


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The example plugin (tests/fixtures/example_plugin.py) installed as distribution ``lmkit-example``."""
    import shutil

    root = tmp_path / "site-example"
    write_fake_plugin(root, "lmkit-example", "example_plugin", (REPO / "tests/fixtures/example_plugin.py").read_text())
    shutil.copytree(REPO / "tests/fixtures/example_plugin_conf", root / "example_plugin_conf")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    yield root
    sys.modules.pop("example_plugin", None)
