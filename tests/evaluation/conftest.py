from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    """A tiny trained GPT run directory (4 steps; byte tokenizer)."""
    import lmkit.cli
    from lmkit_test_utils import TINY

    run = tmp_path_factory.mktemp("eval-run") / "gpt"
    assert lmkit.cli.main([*TINY, f"hydra.run.dir={run}"]) == 0
    return run
