"""Files from elsewhere are data, never code: a pickle payload in a checkpoint or a token cache
does not run, and the CLI refuses the checkpoint with one message and writes nothing."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lmkit_test_utils import TINY
from reliability_helpers import error_lines, run_lmkit, sub_env


class Payload:
    """Unpickling this runs ``touch <marker>`` (if anything ever unpickles it unsafely)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_refuses_a_checkpoint_carrying_code(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": Payload(marker)}, evil)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = run_lmkit(TINY + [f"resume={evil}"], tmp_path, sub_env())
    assert out.returncode == 2, out.stderr[-3000:]
    errors = error_lines(out.stderr)
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert errors[0].startswith(f"lmkit: error: checkpoint '{evil}' was refused: it contains objects other than "
                                f"tensors and plain data")
    assert "weights_only=True so that a file cannot run code" in errors[0]
    assert not marker.exists(), "the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused run writes nothing"


def test_token_cache_carrying_code_is_not_loaded_but_rebuilt(tmp_path):
    from lmkit.data.cache import load_tokens
    from lmkit.data.sources import TextSource
    from lmkit.tokenizers.byte import ByteTokenizer

    (tmp_path / "a.txt").write_text("hello")
    tok = ByteTokenizer()
    load_tokens(TextSource(tmp_path / "a.txt"), tok, tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "tokens").glob("*.npy")
    marker = tmp_path / "PWNED"
    np.save(cached, np.array([Payload(marker)], dtype=object), allow_pickle=True)  # a planted object array
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        tokens = load_tokens(TextSource(tmp_path / "a.txt"), tok, tmp_path / "cache")
    assert not marker.exists(), "the payload ran"
    assert tokens.tolist()[:5] == list(b"hello")
    assert np.load(cached, allow_pickle=False).dtype == np.uint16  # the cache was replaced by plain ids
