"""``python -m lmkit estimate``: published figures (Brown et al. 2020, Patterson et al. 2021) and bad input."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lmkit_test_utils import REPO

# GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, context 2048, GPT-2's
# 50257-token BPE; a config only: estimate never builds the model
GPT3 = ["model=gpt2_124m", "model.n_layer=96", "model.n_head=96", "model.d_model=12288", "model.max_seq_len=2048",
        "model.vocab_size=50257", "data.seq_len=2048"]


def _estimate(args, capsys):
    from lmkit.cli import main

    rc = main(["estimate", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _value(out: str, row: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(row)).split(None, len(row.split()))[-1]


def test_gpt3_training_compute_is_3_14e23(capsys):
    """Brown et al.: 174.6B parameters on 300B tokens, 6ND = 3.14e23 FLOPs (their Table D.1); lmkit's N (every
    parameter but the position table) gives 6ND = 3.142e23, and the attention term adds 2.8% (seq 2048)."""
    rc, out, err = _estimate(GPT3 + ["tokens=3e11", "hardware=v100", "num_devices=10000"], capsys)
    assert rc == 0, err
    six_nd = float(re.search(r"6ND alone: ([0-9.e+]+)", out).group(1))
    total = float(_value(out, "training FLOPs").split()[0])
    assert six_nd == pytest.approx(3.14e23, rel=0.005)  # the paper rounds to 3 digits
    assert total / six_nd - 1 == pytest.approx(12 * 96 * 12288 * 2048 / (6 * 1.7458e11), rel=0.01)


def test_patterson_energy_and_emissions_of_gpt3(capsys):
    """Patterson et al. 2021, Table 4: 10,000 V100s at 330 W average for 14.8 days (355.2 h), PUE 1.1 ->
    1,287 MWh; at 0.429 kg CO2e/kWh -> 552 tCO2e. 14.8 days is rounded to 0.1 day (±0.3%)."""
    rc, out, err = _estimate(GPT3 + ["tokens=3e11", "hardware=v100", "num_devices=10000", "power_w=330",
                                     "hours=355.2", "pue=1.1", "carbon_intensity=0.429"], capsys)
    assert rc == 0, err
    facility = float(_value(out, "energy (facility)").split()[0].replace(",", ""))
    assert "MWh" in _value(out, "energy (facility)")
    assert facility == pytest.approx(1287, rel=0.004)
    tonnes = float(_value(out, "emissions").split()[0])
    assert "t CO2e" in _value(out, "emissions")
    assert tonnes == pytest.approx(552, rel=0.004)
    assert re.search(r"MFU (\d+\.\d)%", out)  # a known duration prints the utilisation it implies


def test_time_at_an_assumed_mfu_and_tokens_from_steps(capsys):
    from lmkit.accounting import flops_from_config
    from lmkit.api import load_run_config

    args = ["model=gpt_tiny", "data.seq_len=128", "trainer.max_steps=1000", "data.batch_size=8"]
    rc, out, err = _estimate(args + ["hardware=h100", "num_devices=2", "mfu=0.5", "pue=1.0"], capsys)
    assert rc == 0, err
    tokens = 1000 * 8 * 2 * 128
    assert _value(out, "tokens").startswith(f"{tokens:.4g}")
    per_token = flops_from_config(load_run_config(args).model, vocab_size=266).per_token(128)  # byte vocabulary
    hours = tokens * per_token / (2 * 989.4e12 * 0.5) / 3600
    assert f"({hours:,.4g} h)" in out
    assert "world average" in out


def test_a_sequence_length_schedule_counts_each_phase_at_its_length(capsys):
    """BERT: 90% of the steps at 128 tokens, the rest at 512; FLOPs per token differ by phase (attention)."""
    from lmkit.accounting import flops_from_config
    from lmkit.api import load_run_config

    args = ["model=gpt_tiny", "data.seq_len=256", "trainer.max_steps=1000", "data.batch_size=8"]
    schedule = ["data.seq_len_schedule=[{until_step: 900, seq_len: 64}]"]
    rc, out, err = _estimate(args + schedule + ["hardware=h100", "mfu=0.5", "pue=1.0"], capsys)
    assert rc == 0, err
    short, long = 900 * 8 * 64, 100 * 8 * 256
    assert _value(out, "tokens").startswith(f"{short + long:.4g}") and "each phase" in out
    f = flops_from_config(load_run_config(args).model, vocab_size=266)
    flops = short * f.per_token(64) + long * f.per_token(256)
    assert _value(out, "training FLOPs").startswith(f"{flops:.4g}")
    assert f.per_token(64) < f.per_token(256)


@pytest.mark.parametrize("args, message", [
    (["hardware=h10"], "unknown hardware 'h10'. Did you mean 'h100'?"),
    (["hardware=h100", "mfu=-0.2"], "mfu=-0.2 must be a number > 0 and <= 1"),
    (["hardware=h100", "mfu=1.5"], "mfu=1.5 must be a number > 0 and <= 1"),
    (["hardware=h100", "num_devces=8"], "unknown option 'num_devces'. Did you mean 'num_devices'?"),
    (["hardware=h100", "pue=0.5"], "pue=0.5 must be a number >= 1"),
    (["hardware=v100", "precision=bf16"], "V100 SXM2 has no bf16 peak; use precision=fp16"),
    (["hardware=h100", "mfu=0.4", "hours=10"], "give mfu (assumed utilisation) or hours (known duration), not both"),
])
def test_bad_input_is_one_error_line(args, message, capsys):
    rc, out, err = _estimate(args, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmkit: error: ") and message in lines[0], err


def test_cli_exit_status_and_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    bad = subprocess.run([sys.executable, "-m", "lmkit", "estimate", "hardware=h100", "mfu=2"], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lmkit: error: estimate: mfu=2 must be a number > 0 and <= 1 (a fraction of the peak, e.g. 0.4)"]
    shown = subprocess.run([sys.executable, "-m", "lmkit", "estimate", "--help"], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m lmkit estimate")
