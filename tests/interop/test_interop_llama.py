"""llama <-> LlamaForCausalLM: logits equal to transformers' to 1e-4 (fp32; tied and untied heads, GQA, MQA,
padding, document-free long rows), export -> import bit-identical, a directory transformers wrote imports,
and HF options lmkit's llama does not compute are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import TOL, batch, first_val_loss_gap, hf_model, max_logit_diff, perturb, same_state, transformers

from lmkit.errors import LmkitError
from lmkit.interop.exporter import export_model
from lmkit.interop.load import load_hf
from lmkit.models.llama import Llama, LlamaConfig
from lmkit.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer(num_sentinels=4)
V = TOK.vocab_size
SMALL = dict(n_layer=2, d_model=32, vocab_size=V, max_seq_len=64, d_ff=48, init_std=0.15)  # logits of a few units

CASES = {
    "untied_gqa": dict(n_head=4, n_kv_head=2),
    "tied_gqa": dict(n_head=4, n_kv_head=2, tie_embeddings=True),
    "untied_mha": dict(n_head=4),
    "tied_mqa_theta": dict(n_head=4, n_kv_head=1, tie_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-6),
    "derived_ffn": dict(n_head=2, n_kv_head=1, d_ff=None, ffn_multiple_of=16),
}

MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_import_is_bit_identical(case, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = perturb(Llama(LlamaConfig(**{**SMALL, **CASES[case]})))
    info = export_model(model, TOK, tmp_path / "hf")
    assert info["architecture"] == "LlamaForCausalLM"
    hf = hf_model(tmp_path / "hf", "AutoModelForCausalLM")
    assert type(hf).__name__ == "LlamaForCausalLM"
    T = 48
    ids, pad = batch(256, T=T, pad_from=T - 9)  # right padding in the last row
    diff = max_logit_diff(model, hf, ids, pad)
    MEASURED[case] = diff
    print(f"llama {case}: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == model.cfg.kv_heads
    assert config["intermediate_size"] == model.cfg.ffn_size
    assert config["tie_word_embeddings"] is model.cfg.tie_embeddings
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert ("lm_head.weight" in state) is not model.cfg.tie_embeddings
    # import: the table read backwards gives the very same tensors, and the same file again
    loaded = load_hf(tmp_path / "hf")
    assert type(loaded.model) is Llama
    assert same_state(model.state_dict(), loaded.model.state_dict()) == []
    assert (loaded.config.kv_heads, loaded.config.ffn_size, loaded.config.rope_theta) == \
           (model.cfg.kv_heads, model.cfg.ffn_size, model.cfg.rope_theta)
    export_model(loaded.model, loaded.tokenizer, tmp_path / "again")
    assert same_state(state, load_file(str(tmp_path / "again" / "model.safetensors"))) == []


def test_hf_written_directory_loads(tmp_path):
    """A LlamaForCausalLM transformers itself created and saved imports with equal logits (GQA, untied)."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf", tokenizer=False)
    assert loaded.config.n_kv_head == 2 and loaded.config.d_ff == 64 and loaded.config.rms_norm_eps == 1e-6
    ids, pad = batch(256, T=20, pad_from=14)
    assert max_logit_diff(loaded.model, hf, ids, pad) < TOL


def test_bare_llama_model_file_imports(tmp_path):
    """A bare LlamaModel (keys without the "model." prefix, tied head) imports with LlamaForCausalLM's logits."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    perturb(hf)
    hf.model.save_pretrained(tmp_path / "bare")
    loaded = load_hf(tmp_path / "bare", tokenizer=False)
    ids, pad = batch(256, T=20, pad_from=14)
    assert max_logit_diff(loaded.model, hf, ids, pad) < TOL


@pytest.mark.parametrize("change, expected", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
])
def test_import_refuses_what_lmkit_cannot_compute(change, expected, tmp_path):
    export_model(Llama(LlamaConfig(**SMALL, n_head=4)), TOK, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(LmkitError, match=expected) as e:
        load_hf(tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_parity_would_catch_meta_interleaved_rope(tmp_path):
    """The half-split layout is what HF computes: Meta's interleaved pairing of q/k rows changes logits by units."""
    torch.manual_seed(0)
    model = perturb(Llama(LlamaConfig(**SMALL, n_head=4, n_kv_head=2)))
    export_model(model, TOK, tmp_path / "hf")
    hf = hf_model(tmp_path / "hf", "AutoModelForCausalLM")
    ids, pad = batch(256, T=32)
    assert max_logit_diff(model, hf, ids, pad) < TOL
    with torch.no_grad():  # rows (pair j: j, j + hd/2) -> (2j, 2j + 1) in every kv head of layer 0
        w = hf.model.layers[0].self_attn.k_proj.weight
        w.copy_(w.view(2, 2, 4, 32).transpose(1, 2).reshape(16, 32))
    assert max_logit_diff(model, hf, ids, pad) > 0.1


def test_trained_run_exports_and_starts_a_new_run(tmp_path, capsys):
    """A trained llama run -> ``lmkit export`` -> transformers' loss equals lmkit's on a validation batch after
    ``init_from`` of the export (weights only, fresh optimizer)."""
    import lmkit.api
    import lmkit.cli
    from lmkit_test_utils import TINY

    argv = ["model=llama_tiny", *TINY, "model.n_kv_head=1", "model.d_ff=64"]
    assert lmkit.cli.main([*argv, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert lmkit.cli.main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 1
    capsys.readouterr()
    built = lmkit.api.build([*argv, f"init_from={tmp_path / 'hf'}"], tmp_path / "new")
    said = capsys.readouterr().out
    assert f"lmkit: init_from: loaded 12 tensors from {tmp_path / 'hf'}" in said, said
    assert first_val_loss_gap(built, tmp_path / 'hf') < 1e-5
