"""The chunked, fused LM head + cross-entropy equals the plain logits path in value and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from objective_helpers import byte_tokenizer, tiny_model

from lmkit.api import load_run_config
from lmkit.errors import ConfigError
from lmkit.objectives.causal_lm import CausalLM, CausalLMConfig
from lmkit.objectives.linear_cross_entropy import linear_cross_entropy
from lmkit.tokenizers.byte import ByteTokenizer


def _inputs(n=1000, d=48, v=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(v, d, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


def _plain(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 128, 333, 1000, 5000])
def test_value_and_gradients_equal_the_plain_path(chunk):
    hidden, weight, labels = _inputs()
    expected = _plain(hidden, weight, labels)
    (0.5 * expected).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    (0.5 * got).backward()  # an upstream gradient other than 1 reaches both inputs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-4, atol=1e-5)


def test_without_grad_and_under_bf16_autocast():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 256), _plain(hidden, weight, labels),
                                   rtol=1e-5, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels, 256)
        expected = _plain(hidden, weight, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0.5)
    got.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, 0)


def test_causal_lm_with_chunked_ce_trains_the_same_gradients():
    tok = ByteTokenizer()
    blocks = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 48):
        model = tiny_model("gpt", tok.vocab_size)
        objective = CausalLM(CausalLMConfig(chunked_ce=chunk), tok)
        out = objective.loss(model, objective.make_collator()(blocks, torch.Generator()))
        out.loss_sum.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
    assert fused.n_targets == plain.n_targets and fused.n_bytes == plain.n_bytes
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _objective(name: str, chunk: int):
    from lmkit.objectives.bart import BARTDenoising, BARTDenoisingConfig
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig, PrefixLMSeq2SeqConfig
    from lmkit.objectives.span_corruption import SpanCorruption, SpanCorruptionConfig
    from lmkit.objectives.ul2 import UL2, UL2Config

    tok = byte_tokenizer(64)
    made = {"span_corruption": lambda: SpanCorruption(SpanCorruptionConfig(chunked_ce=chunk), tok),
            "bart_denoising": lambda: BARTDenoising(BARTDenoisingConfig(chunked_ce=chunk), tok),
            "prefix_lm_seq2seq": lambda: PrefixLM(PrefixLMSeq2SeqConfig(chunked_ce=chunk), tok),
            "prefix_lm": lambda: PrefixLM(PrefixLMConfig(form="decoder", chunked_ce=chunk), tok),
            "ul2": lambda: UL2(UL2Config(chunked_ce=chunk), tok)}[name]()
    return made, tok


@pytest.mark.parametrize("name, arch, kw", [
    ("span_corruption", "t5", {}),
    ("span_corruption", "t5", {"tie_embeddings": False}),  # untied T5 head: no rescaling
    ("ul2", "t5", {}),
    ("prefix_lm_seq2seq", "bart", {}),
    ("bart_denoising", "bart", {}),
    ("prefix_lm", "gpt", {}),
])
def test_every_lm_objective_with_chunked_ce_trains_the_same_gradients(name, arch, kw):
    """T5 (tied: hidden rescaled by d_model**-0.5 before the shared embedding; untied) and BART
    heads through the fused path: same loss and gradients as model.logits + cross-entropy."""
    results = []
    for chunk in (0, 7):
        objective, tok = _objective(name, chunk)
        model = tiny_model(arch, tok.vocab_size, **kw)
        objective.attach(model)
        blocks = torch.randint(3, 256, (4, objective.block_layout(48)[0]),
                               generator=torch.Generator().manual_seed(2))
        out = objective.loss(model, objective.make_collator()(blocks, torch.Generator().manual_seed(3)))
        out.loss_sum.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-4)
    assert fused.n_targets == plain.n_targets and fused.n_bytes == plain.n_bytes
    assert fused_grads.keys() == plain_grads.keys()
    for n, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[n], grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("objective", ["span_corruption", "bart_denoising", "prefix_lm", "prefix_lm_seq2seq", "ul2"])
def test_chunked_ce_is_an_option_of_every_lm_head_objective(objective):
    assert load_run_config([f"+objective={objective}", "objective.chunked_ce=64"]).objective.chunked_ce == 64
    with pytest.raises(ConfigError, match="objective.chunked_ce must be >= 0"):
        load_run_config([f"+objective={objective}", "objective.chunked_ce=-1"])


def test_chunked_ce_needs_a_linear_head_and_a_valid_size():
    tok = ByteTokenizer()
    objective = CausalLM(CausalLMConfig(chunked_ce=16), tok)
    bert = tiny_model("bert", tok.vocab_size)  # its MLM head has a transform and a bias
    with pytest.raises(ConfigError, match="objective.chunked_ce needs an architecture"):
        objective.lm_head_nll(bert, torch.zeros(2, 3, 32), torch.zeros(2, 3, dtype=torch.long), 16)
    with pytest.raises(ConfigError, match="objective.chunked_ce must be >= 0"):
        load_run_config(["+objective=causal_lm", "objective.chunked_ce=-1"])
