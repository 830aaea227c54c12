"""Fixtures of the reliability tests (helpers: reliability_helpers.py)."""
from __future__ import annotations

import pytest

from reliability_helpers import FAULTS_SOURCE


@pytest.fixture
def faults(fake_plugin):
    """The fault plugin installed as distribution ``lmkit-faults`` (in this process and in subprocesses)."""
    from lmkit.plugins import get_plugin_manager

    root = fake_plugin("lmkit-faults", "lmkit_test_faults", FAULTS_SOURCE)
    get_plugin_manager.cache_clear()
    yield root
    get_plugin_manager.cache_clear()
