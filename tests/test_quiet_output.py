"""What a run prints is lmkit's summary and nothing that does not apply: no advertisement, no warnings about
lmkit's own design, no logger version in the progress bar, no run directory that was never created, and
bits/byte only where it means the same thing (causal LM)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lmkit_test_utils import TINY

NOT_FOR_LMKIT = (
    "litlogger",  # Lightning's advertisement
    "Using ModelCheckpoint with manual optimization",  # lmkit checkpoints after the step on purpose
    "v_num",  # the logger version in the progress bar
    "anonymous setting",  # wandb's warning about an argument Lightning passes
    "sync_dist=True",  # val metrics are torchmetrics, already synced
)


def run(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_a_run_prints_nothing_that_does_not_apply(tmp_path):
    args = [a for a in TINY if not a.startswith(("trainer.progress_bar", "logger="))]
    out = run(args + ["trainer.progress_bar=true", "logger=wandb", "logger.mode=offline"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    for text in NOT_FOR_LMKIT:
        assert text not in printed, (text, printed[-3000:])
    assert "Epoch 0" in printed  # the progress bar itself is still there


def test_refused_run_does_not_name_a_run_directory(tmp_path):
    out = run(TINY + ["data=text", f"data.path={tmp_path / 'missing.txt'}"], tmp_path)
    assert out.returncode == 2
    assert "run directory" not in out.stdout + out.stderr
    assert not (tmp_path / "outputs").exists()


def test_bits_per_byte_only_for_causal_lm(tmp_path, capsys, monkeypatch):
    from lmkit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(TINY) == 0
    causal = capsys.readouterr().out
    assert "bits/byte" in causal
    small_t5 = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]
    tiny = [a for a in TINY if not a.startswith("model.")]
    assert main(["+objective=span_corruption", *tiny, *small_t5, "data.seq_len=32"]) == 0
    span = capsys.readouterr().out
    assert "validation at end:   loss" in span and "perplexity" in span
    assert "bits/byte" not in span  # masked spans are a sample of the text, not a compression rate


def test_trained_tokenizer_cache_file_name_is_plain(tmp_path):
    from lmkit.tokenizers.trained import load_or_train

    texts = lambda: ["to be or not to be, that is the question"] * 50  # noqa: E731
    load_or_train("bpe", texts, "files:abc:None:'\\n\\n'/x", tmp_path, vocab_size=300, num_sentinels=0,
                  min_frequency=1)
    names = [p.name for p in (tmp_path / "tokenizers").iterdir()]
    assert len(names) == 1 and re.fullmatch(r"bpe-300-1-[0-9a-f]{16}\.json", names[0]), names
