"""Compute accounting: FLOPs per token against independent counts, the hardware table, CO2e, and a short run."""
from __future__ import annotations

import csv
import socket

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmkit_test_utils import REPO, TINY

from lmkit.accounting import emissions_kg, flops_from_config, flops_from_model
from lmkit.accounting.hardware import ACCELERATORS, detect_accelerator, find_accelerator, matmul_precision
from lmkit.errors import ConfigError

TINY_PRESETS = ("gpt_tiny", "llama_tiny", "bert_tiny", "albert_tiny", "t5_tiny", "bart_tiny")
V = 300


def _preset(name: str):
    from lmkit.plugins import get_plugin_manager

    fields = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    component = get_plugin_manager().get("architecture", fields["name"])
    return component, component.config_cls(**{**fields, "vocab_size": V})


def _moe_plugin(monkeypatch):
    try:
        import lmkit_moe  # noqa: F401
    except ImportError:  # the plugin's source tree, when it is not installed here
        monkeypatch.syspath_prepend(str(REPO / "plugins" / "lmkit-moe"))
    from lmkit_moe.plugin import apply_moe

    return apply_moe


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_analytic_count_equals_the_built_models(name):
    """The config-only count (used by estimate) and the count walked from the built model agree exactly,
    and N is the built model's parameters minus lookup tables and pooler, plus the tied head once."""
    component, cfg = _preset(name)
    model = component.factory(cfg)
    walked = flops_from_model(model)
    assert flops_from_config(cfg) == walked
    lookup = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    pooler = sum(p.numel() for p in model.pooler.parameters()) if getattr(model, "pooler", None) is not None else 0
    head = V * (cfg.embedding_size if name == "albert_tiny" else cfg.d_model)
    tied = getattr(model, "lm_head", None) is None
    # ALBERT: its one shared layer counts once per layer (4 uses)
    shared = (cfg.n_layer - 1) * sum(p.numel() for p in model.blocks[0].parameters()) if name == "albert_tiny" else 0
    expected = sum(p.numel() for p in model.parameters()) - lookup - pooler + (head if tied else 0) + shared
    assert walked.total_params == expected


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_banded_layers_count_their_window_not_the_sequence(arch):
    """alternating_local: odd layers attend to W keys, so their attention term is 12·H·Q·W, not 12·H·Q·T."""
    import dataclasses

    component, dense_cfg = _preset(f"{arch}_tiny")
    cfg = dataclasses.replace(dense_cfg, attention="alternating_local", attention_window=16)
    counted = flops_from_config(cfg)
    assert counted == flops_from_model(component.factory(cfg))
    assert (counted.banded_layers, counted.window) == (cfg.n_layer // 2, 16)
    dense = flops_from_config(dense_cfg)
    T = 128
    assert dense.per_token(T) - counted.per_token(T) == 12 * cfg.d_model * (cfg.n_layer // 2) * (T - 16)
    assert dense.per_token(8) == counted.per_token(8)  # a window longer than the sequence bands nothing


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_6n_plus_attention_matches_measured_matmul_flops(arch):
    """FlopCounterMode over forward + backward (SDPA's math path, so the attention matmuls are counted):
    measured = analytic - 6 x (bias and norm parameters), which add or scale but never multiply a matrix.
    Residual: 0.78% for gpt_tiny (biases, LayerNorms), 0.10% for llama_tiny (RMSNorm weights only).
    Softmax, GELU/SiLU, RoPE and the loss are not counted by either side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    component, cfg = _preset(f"{arch}_tiny")
    torch.manual_seed(0)
    model = component.factory(cfg)
    B, T = 2, 64
    x = torch.randint(0, V, (B, T + 1))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        hidden = model(x[:, :-1])
        F.cross_entropy(model.logits(hidden).flatten(0, 1), x[:, 1:].flatten()).backward()
    measured = counter.get_total_flops() / (B * T)
    analytic = flops_from_model(model).per_token(T)
    not_matmul = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert measured == pytest.approx(analytic - 6 * not_matmul, rel=1e-9)
    assert abs(analytic / measured - 1) < (0.01 if arch == "gpt" else 0.002)


@pytest.mark.parametrize("name", ["gpt_tiny", "llama_tiny", "t5_tiny"])
def test_switch_model_costs_the_dense_model_plus_the_router(name, monkeypatch):
    """One expert active per token: a switch model's FLOPs/token = the dense model's (same d_ff) + 6·d·E per MoE layer."""
    apply_moe = _moe_plugin(monkeypatch)
    component, cfg = _preset(name)
    experts, every = 4, 2
    dense = flops_from_model(component.factory(cfg))
    switch = flops_from_model(apply_moe(component.factory(cfg), {"num_experts": experts, "every": every}))
    n_blocks = cfg.n_layer * (2 if name == "t5_tiny" else 1)
    router = 6 * cfg.d_model * experts * (n_blocks // every)
    T = 32
    total = lambda f: f.per_token(T) + f.per_decoder_token(T, T)  # noqa: E731
    assert total(switch) == total(dense) + router
    assert flops_from_config(cfg, moe={"num_experts": experts, "every": every}) == switch
    top2 = flops_from_model(apply_moe(component.factory(cfg), {"num_experts": experts, "every": every, "top_k": 2}))
    assert top2.total_params > switch.total_params  # two experts active: their FFN counts twice


def test_encoder_decoder_batch_counts_both_sides():
    component, cfg = _preset("t5_tiny")
    f = flops_from_config(cfg)
    batch = {"input_ids": torch.zeros(2, 40, dtype=torch.long), "decoder_input_ids": torch.zeros(2, 12, dtype=torch.long)}
    flops, tokens = f.batch_of(batch)
    assert tokens == 80
    d, L = cfg.d_model, cfg.n_layer
    assert flops == 80 * (6 * f.params + 12 * L * d * 40) + 24 * (6 * f.decoder_params + 12 * L * d * (12 + 40))


def test_unknown_architecture_has_no_analytic_count():
    from types import SimpleNamespace

    with pytest.raises(ConfigError, match="flops_from_model"):
        flops_from_config(SimpleNamespace(name="mamba", vocab_size=10, d_model=8))


def test_hardware_table_and_detection():
    assert ACCELERATORS["h100_sxm"].bf16 == pytest.approx(989.4e12)  # the peak docs/benchmarks.md uses
    assert ACCELERATORS["a100_80gb_sxm"].bf16 == 312e12 and ACCELERATORS["a100_80gb_sxm"].power_w == 400
    for name, key in [("NVIDIA H100 80GB HBM3", "h100_sxm"), ("NVIDIA H100 PCIe", "h100_pcie"),
                      ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100_80gb_sxm"),
                      ("NVIDIA A100-SXM4-40GB", "a100_40gb_sxm"), ("NVIDIA A100 80GB PCIe", "a100_80gb_pcie"),
                      ("NVIDIA L4", "l4"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"),
                      ("Tesla V100-SXM2-16GB", "v100_sxm"), ("NVIDIA GeForce RTX 4090", "rtx4090")]:
        assert detect_accelerator(name).key == key, name
    assert detect_accelerator("NVIDIA L40S") is None and detect_accelerator(None) is None
    assert find_accelerator("H100").key == "h100_sxm"
    with pytest.raises(ConfigError, match="Did you mean 'h100'"):
        find_accelerator("h10")
    assert matmul_precision("bf16-mixed") == "bf16" and matmul_precision("16-mixed") == "fp16"


def test_emissions_arithmetic_of_patterson_et_al():
    """Patterson et al. 2021, GPT-3: 1,287 MWh (PUE 1.1 already folded in) at 0.429 kg/kWh -> 552 tCO2e."""
    assert emissions_kg(1_287_000 / 1.1, 1.1, 0.429) / 1000 == pytest.approx(552, abs=0.5)


def test_callback_options_are_validated():
    from lmkit.accounting.callback import ComputeAccountingConfig

    for kwargs, text in [({"pue": 0.9}, "pue must be a number >= 1"), ({"energy": "rapl"}, "energy must be one of"),
                         ({"carbon_intensity": -1.0}, "carbon_intensity"), ({"country_iso_code": "FRN"}, "Did you mean"),
                         ({"hardware": "h1000"}, "unknown hardware")]:
        with pytest.raises(ConfigError, match=text) as e:
            ComputeAccountingConfig(**kwargs)
        assert "\n" not in str(e.value)
    assert ComputeAccountingConfig(country_iso_code="fra").country_iso_code == "FRA"


def test_short_run_counts_tokens_and_measures_energy_offline(tmp_path, monkeypatch, capsys):
    """3 steps of batch 4 x 32 tokens: train/tokens_seen = 384; the summary's compute line; codecarbon's
    emissions.csv in the run directory and nothing written outside it; no socket is opened."""
    from lmkit.cli import main

    attempts = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("callbacks=", "logger=", "trainer.max_steps"))]
    rc = main(args + ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "logger=csv",
                      "callbacks=[compute_accounting]", "+callback_options.compute_accounting.country_iso_code=FRA",
                      "+callback_options.compute_accounting.pue=1.1", f"hydra.run.dir={run_dir}"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out[-2000:]
    assert not attempts
    assert "[codecarbon" not in captured.out + captured.err  # quiet: errors only
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    seen = [float(r["train/tokens_seen"]) for r in rows if r.get("train/tokens_seen")]
    assert seen == [128.0, 256.0, 384.0]  # steps x batch 4 x seq_len 32, cumulative
    per_token = [float(r["train/flops_per_token"]) for r in rows if r.get("train/flops_per_token")]
    assert len(per_token) == 1 and per_token[0] > 0
    assert any(r.get("train/co2e_kg") for r in rows)
    line = next(l for l in out.splitlines() if l.startswith("compute: "))
    assert " 384 tokens" in line and "× PUE 1.1 →" in line and "(FRA grid, codecarbon data; codecarbon offline" in line
    assert (run_dir / "emissions.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_default_run_enables_the_callback():
    from lmkit.api import load_run_config

    names = [c.name for c in load_run_config([]).callbacks]
    assert names == ["token_throughput", "compute_accounting"]
