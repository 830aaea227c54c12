"""Each family: a tiny lmkit model exported, loaded by transformers offline, logits equal to 1e-4 (fp32);
imported back bit for bit; configurations HF cannot compute refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from interop_helpers import TOL, batch, hf_model, max_logit_diff, perturb, same_state, transformers

from lmkit.errors import LmkitError
from lmkit.interop.exporter import export_model
from lmkit.interop.load import load_hf
from lmkit.models.albert import ALBERT, ALBERTConfig
from lmkit.models.bart import BART, BARTConfig
from lmkit.models.bert import BERT, BERTConfig
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.t5 import T5, T5Config
from lmkit.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer(num_sentinels=4)
V = TOK.vocab_size
SMALL = dict(n_layer=2, n_head=2, d_model=32, vocab_size=V)

CASES = {
    "gpt_tied": (lambda: GPT(GPTConfig(**SMALL, max_seq_len=64)), "AutoModelForCausalLM"),
    "gpt_untied": (lambda: GPT(GPTConfig(**SMALL, max_seq_len=64, tie_embeddings=False)), "AutoModelForCausalLM"),
    "gpt_no_bias": (lambda: GPT(GPTConfig(**SMALL, max_seq_len=64, bias=False)), "AutoModelForCausalLM"),
    "bert": (lambda: BERT(BERTConfig(**SMALL, max_seq_len=64, d_ff=48)), "AutoModelForMaskedLM"),
    "bert_tanh_gelu_no_segments": (lambda: BERT(BERTConfig(**SMALL, max_seq_len=64, activation="gelu",
                                                           type_vocab_size=0, pooler=False)), "AutoModelForMaskedLM"),
    "albert_share_all": (lambda: ALBERT(ALBERTConfig(**{**SMALL, "n_layer": 3}, embedding_size=16, max_seq_len=64)),
                         "AutoModelForMaskedLM"),
    "albert_share_none": (lambda: ALBERT(ALBERTConfig(**{**SMALL, "n_layer": 3}, embedding_size=16, max_seq_len=64,
                                                      share="none")), "AutoModelForMaskedLM"),
    # 48 tokens > max_distance=16: the log-spaced and the clipped buckets are both used
    "t5_tied_relu": (lambda: T5(T5Config(**SMALL, n_decoder_layer=3, num_buckets=8, max_distance=16)),
                     "AutoModelForSeq2SeqLM"),
    "t5_untied_gated": (lambda: T5(T5Config(**SMALL, tie_embeddings=False, ffn="gated-gelu", num_buckets=8,
                                            max_distance=16)), "AutoModelForSeq2SeqLM"),
    "t5_untied_relu": (lambda: T5(T5Config(**SMALL, tie_embeddings=False, num_buckets=8, max_distance=16)),
                       "AutoModelForSeq2SeqLM"),
    "t5_tied_gated": (lambda: T5(T5Config(**SMALL, ffn="gated-gelu", num_buckets=8, max_distance=16)),
                      "AutoModelForSeq2SeqLM"),
    # 48 = max_seq_len: the last position row (HF row 49 after the offset of 2) is used
    "bart": (lambda: BART(BARTConfig(**SMALL, n_decoder_layer=1, max_seq_len=48)), "AutoModelForSeq2SeqLM"),
    "bart_scaled_embedding": (lambda: BART(BARTConfig(**SMALL, max_seq_len=48, scale_embedding=True,
                                                      activation="relu")), "AutoModelForSeq2SeqLM"),
}

MEASURED: dict[str, float] = {}


def _compare(model, hf) -> float:
    T = 48
    ids, pad = batch(256, T=T, pad_from=T - 9)
    if model.kind == "encoder_decoder":
        dec, dec_pad = batch(256, T=T, pad_from=T - 5, seed=1)
        return max_logit_diff(model, hf, ids, pad, dec=dec, dec_pad=dec_pad)
    if getattr(model.cfg, "type_vocab_size", 0) > 0:
        tt = torch.zeros_like(ids)
        tt[:, T // 2:] = 1
        return max_logit_diff(model, hf, ids, pad, token_type_ids=tt)
    return max_logit_diff(model, hf, ids, pad)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_and_import_is_bit_identical(case, tmp_path):
    torch.manual_seed(0)
    build, auto = CASES[case]
    model = perturb(build())
    info = export_model(model, TOK, tmp_path / "hf")
    hf = hf_model(tmp_path / "hf", auto)
    assert type(hf).__name__ == info["architecture"]
    diff = _compare(model, hf)
    MEASURED[case] = diff
    print(f"{case}: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # import: the tables read backwards give the very same tensors
    loaded = load_hf(tmp_path / "hf")
    skip = ("pooler.",) if info["left_out"] else ()
    assert same_state(model.state_dict(), loaded.model.state_dict(), skip) == []
    assert type(loaded.model) is type(model)
    # and exporting the import again writes the same file contents
    from safetensors.torch import load_file

    export_model(loaded.model, loaded.tokenizer, tmp_path / "again")
    assert same_state(load_file(str(tmp_path / "hf" / "model.safetensors")),
                      load_file(str(tmp_path / "again" / "model.safetensors"))) == []


def test_tied_heads_are_not_written(tmp_path):
    from safetensors.torch import load_file

    export_model(GPT(GPTConfig(**SMALL, max_seq_len=32)), TOK, tmp_path / "gpt")
    export_model(T5(T5Config(**SMALL)), TOK, tmp_path / "t5")
    export_model(BART(BARTConfig(**SMALL, max_seq_len=32)), TOK, tmp_path / "bart")
    gpt = load_file(str(tmp_path / "gpt" / "model.safetensors"))
    t5 = load_file(str(tmp_path / "t5" / "model.safetensors"))
    bart = load_file(str(tmp_path / "bart" / "model.safetensors"))
    assert "lm_head.weight" not in gpt and "lm_head.weight" not in t5 and "lm_head.weight" not in bart
    assert "encoder.embed_tokens.weight" not in t5 and "model.decoder.embed_tokens.weight" not in bart
    assert bart["model.encoder.embed_positions.weight"].shape[0] == 32 + 2  # BART's offset of 2
    assert torch.count_nonzero(bart["final_logits_bias"]) == 0
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["decoder_start_token_id"] == TOK.pad_id
    assert json.loads((tmp_path / "bart" / "config.json").read_text())["decoder_start_token_id"] == TOK.eos_id


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_sentence_pair_head_exports_as_pretraining_model(family, tmp_path):
    torch.manual_seed(0)
    if family == "bert":
        model = perturb(BERT(BERTConfig(**SMALL, max_seq_len=64)))
    else:
        model = perturb(ALBERT(ALBERTConfig(**SMALL, embedding_size=16, max_seq_len=64)))
    head = torch.nn.Linear(32, 2)
    heads = {f"objective.pair_head.{k}": v for k, v in head.state_dict().items()}
    info = export_model(model, TOK, tmp_path / "hf", head_state=heads)
    assert info["architecture"] == ("BertForPreTraining" if family == "bert" else "AlbertForPreTraining")
    assert info["left_out"] == []
    hf = hf_model(tmp_path / "hf", "AutoModelForPreTraining")
    ids, pad = batch(256, T=20, pad_from=15)
    tt = torch.zeros_like(ids)
    tt[:, 10:] = 1
    with torch.no_grad():
        hidden = model(ids, padding_mask=pad, token_type_ids=tt)
        out = hf(input_ids=ids, attention_mask=pad.long(), token_type_ids=tt)
        pair = head(model.pooled(hidden))
    assert (model.logits(hidden) - out.prediction_logits)[pad].abs().max() < TOL
    pair_hf = out.seq_relationship_logits if family == "bert" else out.sop_logits
    assert (pair - pair_hf).abs().max() < TOL
    loaded = load_hf(tmp_path / "hf")
    assert same_state(model.state_dict(), loaded.model.state_dict()) == []
    assert same_state(heads, loaded.heads) == []


def test_masked_lm_export_leaves_out_the_untrained_pooler(tmp_path):
    info = export_model(BERT(BERTConfig(**SMALL, max_seq_len=32)), TOK, tmp_path / "hf")
    assert info["architecture"] == "BertForMaskedLM"
    assert len(info["left_out"]) == 1 and info["left_out"][0].startswith("pooler.*")
    assert load_hf(tmp_path / "hf").config.pooler is False


REFUSED = [
    (lambda: BERT(BERTConfig(**SMALL, pre_ln=True)), "pre_ln=true"),
    (lambda: BERT(BERTConfig(**SMALL, head_transform=False)), "head_transform=false"),
    (lambda: ALBERT(ALBERTConfig(**SMALL, share="attention")), "share=attention"),
    (lambda: BART(BARTConfig(**SMALL, layer_norm_eps=1e-6)), "layer_norm_eps"),
]


@pytest.mark.parametrize("build,expected", REFUSED)
def test_configurations_hf_cannot_compute_are_refused_in_one_line(build, expected, tmp_path):
    with pytest.raises(LmkitError, match=expected) as e:
        export_model(build(), TOK, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_mixture_of_experts_model_is_refused(tmp_path):
    lmkit_moe = pytest.importorskip("lmkit_moe.plugin")
    model = GPT(GPTConfig(**SMALL, max_seq_len=32))
    lmkit_moe.apply_moe(model, lmkit_moe.MoEConfig(num_experts=2))
    with pytest.raises(LmkitError, match="mixture-of-experts") as e:
        export_model(model, TOK, tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_import_refuses_what_lmkit_cannot_compute(tmp_path):
    export_model(GPT(GPTConfig(**SMALL, max_seq_len=32)), TOK, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(LmkitError, match="activation_function='relu'"):
        load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(LmkitError, match="supported model types: gpt2 .*bert.*albert.*t5.*bart"):
        load_hf(tmp_path / "hf")


def test_import_names_leftover_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    export_model(GPT(GPTConfig(**SMALL, max_seq_len=32)), TOK, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    state["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    del state["transformer.ln_f.weight"]
    save_file(state, str(path))
    with pytest.raises(LmkitError, match=r"unexpected tensors: transformer\.h\.0\.attn\.extra\.weight; "
                                         r"missing tensors: transformer\.ln_f\.weight"):
        load_hf(tmp_path / "hf")


def test_hf_written_directory_loads(tmp_path):
    """A directory transformers itself saved (HF naming, its own tie handling) imports with equal logits."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf", tokenizer=False)
    ids, pad = batch(256, T=16)
    assert max_logit_diff(loaded.model, hf, ids, pad) < TOL


def test_pytorch_model_bin_is_read_weights_only(tmp_path):
    from safetensors.torch import load_file

    model = perturb(GPT(GPTConfig(**SMALL, max_seq_len=32)))
    export_model(model, TOK, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(path))
    path.unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    assert same_state(model.state_dict(), load_hf(tmp_path / "hf").model.state_dict()) == []

    class Evil:  # anything but tensors and plain data is refused, never unpickled
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"x": Evil()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(LmkitError, match="weights_only=True"):
        load_hf(tmp_path / "hf")
