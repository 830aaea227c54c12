"""data.val_seq_lens: validation at several sequence lengths (val/len<L>/loss beside val/loss)."""
from __future__ import annotations

import pytest

from lmkit.api import run
from lmkit_test_utils import TINY, one_error_line

START = TINY + ["model.max_seq_len=64", "trainer.max_steps=1", "trainer.validate_at_start=true"]


def test_each_length_scores_like_a_run_validated_at_that_length(tmp_path):
    """At the start (same seeded weights), val/len16/loss of a seq_len-32 run is val/loss of a seq_len-16 run,
    and val/loss itself is what it is without the extra lengths."""
    both = run(START + ["data.val_seq_lens=[16, 64]"], tmp_path / "both")["start"]
    at16 = run(START + ["data.seq_len=16"], tmp_path / "at16")["start"]
    at64 = run(START + ["data.seq_len=64"], tmp_path / "at64")["start"]
    plain = run(START, tmp_path / "plain")["start"]
    assert both["val/loss"] == plain["val/loss"]
    for length, ref in ((16, at16), (64, at64)):
        for metric in ("loss", "ppl", "bpb"):
            assert both[f"val/len{length}/{metric}"] == pytest.approx(ref[f"val/{metric}"], rel=1e-5), (length, metric)
    assert both["val/len16/loss"] != both["val/len64/loss"]


def test_lengths_are_logged_and_work_with_an_encoder_objective(tmp_path):
    out = run(TINY + ["+objective=mlm", "model=bert_tiny", "model.max_seq_len=64", "data.val_seq_lens=[48]",
                      "trainer.max_steps=2", "logger=csv"], tmp_path / "mlm")
    assert "val/len48/loss" in out["end"] and "val/len48/bpb" not in out["end"]  # MLM scores masked tokens only
    header = (tmp_path / "mlm" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "val/len48/loss" in header.split(",")


@pytest.mark.parametrize("extra,expected", [
    (["data.val_seq_lens=[16, 128]"], "data.val_seq_lens[1]=128 is longer than the model's positions (model.max_seq_len=64)"),
    (["data.val_seq_lens=[16, 16]"], "data.val_seq_lens=[16, 16] lists a length twice"),
    (["data.val_seq_lens=16"], "data.val_seq_lens must be a non-empty list of sequence lengths"),
    (["data.val_seq_lens=[1]"], "data.val_seq_lens[0]"),
    (["+objective=sft"], "data.val_seq_lens needs an objective that cuts blocks from packed text"),
    (["model.memory_len=16", "model=transformer_xl_tiny"], "data.val_seq_lens cannot be combined with a model whose memory"),
])
def test_bad_lengths_are_refused_in_one_line(capsys, tmp_path, extra, expected):
    args = TINY + ["data.val_seq_lens=[16]", *extra, f"hydra.run.dir={tmp_path / 'run'}"]
    one_error_line(capsys, args, expected)
    assert not (tmp_path / "run").exists()
