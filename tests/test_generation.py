"""Generation: cached == uncached decoding, greedy == transformers' generate on the exported model,
seeds, top-k/top-p filtering, stop strings held back while streaming, and the ``generate`` verb."""
from __future__ import annotations

import os

import pytest
import torch

from lmkit.errors import LmkitError
from lmkit.generation import (
    GenerationOptions,
    _Stream,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate,
    generate_ids,
    next_tokens,
    supports_cache,
)
from lmkit.models.bart import BART, BARTConfig
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.llama import Llama, LlamaConfig
from lmkit.models.t5 import T5, T5Config
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit_test_utils import one_error_line as _one_error

TOK = ByteTokenizer(num_sentinels=4)
V = TOK.vocab_size
SMALL = dict(n_layer=2, n_head=2, d_model=32, vocab_size=V)


def _perturbed(model, scale=None):
    """Larger random weights, so that greedy decoding does not repeat one token forever (a scale per family,
    found by trying)."""
    scale = scale or (0.2 if model.cfg.name == "bart" else 0.3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim == 1 else scale))
    return model.eval()


MODELS = {
    "gpt": lambda: GPT(GPTConfig(**SMALL, max_seq_len=96)),
    "gpt_untied": lambda: GPT(GPTConfig(**SMALL, max_seq_len=96, tie_embeddings=False)),
    # 60 decoder steps > max_distance=16: log-spaced and clipped buckets both used
    "t5": lambda: T5(T5Config(**SMALL, n_decoder_layer=3, num_buckets=8, max_distance=16)),
    "t5_gated_untied": lambda: T5(T5Config(**SMALL, ffn="gated-gelu", tie_embeddings=False, num_buckets=8,
                                           max_distance=16)),
    "bart": lambda: BART(BARTConfig(**SMALL, max_seq_len=96)),
    "llama_gqa": lambda: Llama(LlamaConfig(**SMALL, n_kv_head=1, max_seq_len=96)),
}
START = {"gpt": None, "t5": TOK.pad_id, "bart": TOK.eos_id, "llama": None}


def _start(case):
    return START[case.split("_")[0]]


PROMPT = list(b"ROMEO: what light through yonder")


@pytest.mark.parametrize("case", list(MODELS))
def test_cached_decoding_equals_rerunning_the_full_context(case):
    torch.manual_seed(0)
    model = _perturbed(MODELS[case]()).double()  # fp64: rounding noise far below the tolerance, a bug far above
    assert supports_cache(model)
    cached, uncached = [], []
    opts = dict(max_new_tokens=60, temperature=0)
    a, _ = generate_ids(model, PROMPT, GenerationOptions(**opts), decoder_start_id=_start(case), logits_out=cached)
    b, _ = generate_ids(model, PROMPT, GenerationOptions(**opts, use_cache=False), decoder_start_id=_start(case),
                        logits_out=uncached)
    assert a == b and len(a[0]) == 60
    assert len(set(a[0])) >= 5  # not one token repeated: the positions matter
    diff = max((x - y).abs().max().item() for x, y in zip(cached, uncached))
    assert diff < 1e-5, diff
    # sampling with a seed: the same draws either way, in a batch of 3
    s = dict(max_new_tokens=20, temperature=1.0, top_k=50, num_samples=3, seed=7)
    c, _ = generate_ids(model, PROMPT, GenerationOptions(**s), decoder_start_id=_start(case))
    u, _ = generate_ids(model, PROMPT, GenerationOptions(**s, use_cache=False), decoder_start_id=_start(case))
    assert c == u and len({tuple(x) for x in c}) == 3


@pytest.mark.parametrize("case", ["gpt", "gpt_untied", "llama_gqa"])
def test_static_cache_equals_the_dynamic_cache(case):
    """cache=static (fixed shapes: every step attends over all max_seq_len cache entries, later ones masked) gives
    the dynamic cache's logits and tokens, greedy and seeded sampling in a batch of 3."""
    torch.manual_seed(0)
    model = _perturbed(MODELS[case]()).double()
    for opts in (dict(max_new_tokens=60, temperature=0),
                 dict(max_new_tokens=20, temperature=1.0, top_k=50, num_samples=3, seed=7)):
        dynamic, static = [], []
        a, _ = generate_ids(model, PROMPT, GenerationOptions(**opts), logits_out=dynamic)
        b, _ = generate_ids(model, PROMPT, GenerationOptions(**opts, cache="static"), logits_out=static)
        assert a == b and len(set(a[0])) >= 5
        assert max((x - y).abs().max().item() for x, y in zip(dynamic, static)) < 1e-9
    # another prompt length reuses the same caches (stale entries beyond the prompt stay masked)
    short = list(b"ROMEO:")
    a, _ = generate_ids(model, short, GenerationOptions(max_new_tokens=30, temperature=0))
    b, _ = generate_ids(model, short, GenerationOptions(max_new_tokens=30, temperature=0, cache="static"))
    assert a == b
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())


def test_compiled_decoding_equals_eager_and_compiles_once():
    """compile=true: the decode step over the static cache compiled once (one graph), the same tokens and logits
    as eager decoding; a second prompt of another length reuses the compiled step."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _perturbed(MODELS["llama_gqa"]())
    eager, compiled = [], []
    a, _ = generate_ids(model, PROMPT, GenerationOptions(max_new_tokens=24, temperature=0), logits_out=eager)
    graphs = counters["stats"]["unique_graphs"]
    b, _ = generate_ids(model, PROMPT, GenerationOptions(max_new_tokens=24, temperature=0, compile=True),
                        logits_out=compiled)
    assert a == b and len(set(a[0])) >= 5
    assert max((x - y).abs().max().item() for x, y in zip(eager, compiled)) < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs + 1
    c, _ = generate_ids(model, PROMPT[:7], GenerationOptions(max_new_tokens=24, temperature=0, compile=True))
    d, _ = generate_ids(model, PROMPT[:7], GenerationOptions(max_new_tokens=24, temperature=0))
    assert c == d and counters["stats"]["unique_graphs"] == graphs + 1


def test_static_caches_come_in_buckets_of_256_positions():
    from lmkit.generation import static_length

    assert [static_length(n, 1024) for n in (1, 256, 257, 1000)] == [256, 256, 512, 1024]
    assert static_length(300, 300) == 300 and static_length(10, 96) == 96


def test_static_cache_is_refused_where_it_does_not_apply():
    t5 = _perturbed(MODELS["t5"]())
    with pytest.raises(LmkitError, match="no static-cache decoding"):
        generate_ids(t5, PROMPT, GenerationOptions(max_new_tokens=2, cache="static"), decoder_start_id=TOK.pad_id)
    with pytest.raises(LmkitError, match="Did you mean 'static'"):
        GenerationOptions(cache="statik").check()
    with pytest.raises(LmkitError, match="needs use_cache=true"):
        GenerationOptions(compile=True, use_cache=False).check()


def test_training_forward_is_untouched_by_a_finished_generation():
    model = _perturbed(MODELS["gpt"]())
    ids = torch.tensor([PROMPT])
    before = model(ids)
    generate_ids(model, PROMPT, GenerationOptions(max_new_tokens=5, temperature=0))
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())
    assert torch.equal(before, model(ids))


HF_CLASS = {"gpt": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration",
            "llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("case", list(MODELS))
def test_greedy_output_equals_transformers_generate_on_the_export(case, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from lmkit.interop.exporter import export_model

    torch.manual_seed(0)
    model = _perturbed(MODELS[case]())
    family = case.split("_")[0]
    export_model(model, TOK, tmp_path / "hf")
    hf = getattr(transformers, HF_CLASS[family]).from_pretrained(str(tmp_path / "hf")).eval()
    n = 40
    ours, _ = generate_ids(model, PROMPT, GenerationOptions(max_new_tokens=n, temperature=0), eos_id=TOK.eos_id,
                           decoder_start_id=_start(case))
    kwargs = dict(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)
    if family == "t5" and model.cfg.n_decoder_layer not in (None, model.cfg.n_layer):
        # transformers 5.25 sizes T5's generation cache by the encoder's layer count (IndexError in cache_utils
        # with more decoder layers): its uncached generate gives the same tokens
        kwargs["use_cache"] = False
    if model.kind == "encoder_decoder":
        kwargs["decoder_start_token_id"] = _start(case)
        assert hf.config.decoder_start_token_id == _start(case)  # what the export writes
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          **kwargs)[0].tolist()
    theirs = out[len(PROMPT):] if model.kind == "decoder" else out[1:]
    if TOK.eos_id in theirs:
        theirs = theirs[:theirs.index(TOK.eos_id)]
    assert ours[0] == theirs
    assert len(ours[0]) >= 5


def test_a_seed_reproduces_the_samples_and_another_seed_differs():
    model = _perturbed(MODELS["gpt"]())
    run = lambda seed: generate(model, TOK, "ROMEO:", max_new_tokens=16, temperature=1.0, num_samples=2, seed=seed)
    first = run(3)
    assert first == run(3)
    assert first != run(4)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)


def test_top_k_and_top_p_keep_exactly_the_allowed_tokens():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = probs.log()[None]
    finite = lambda t: set(torch.isfinite(t[0]).nonzero().flatten().tolist())
    assert finite(filter_top_k(logits, 2)) == {1, 3}
    assert finite(filter_top_k(logits, 1)) == {1}
    assert finite(filter_top_k(logits, 5)) == {0, 1, 2, 3, 4}
    # nucleus: the most likely tokens until their mass reaches p
    assert finite(filter_top_p(logits, 0.45)) == {1}
    assert finite(filter_top_p(logits, 0.6)) == {1, 3}
    assert finite(filter_top_p(logits, 0.75)) == {1, 3, 4}
    assert finite(filter_top_p(logits, 0.9)) == {1, 3, 4, 2}
    assert finite(filter_top_p(logits, 1.0)) == {0, 1, 2, 3, 4}
    # batched rows are filtered independently; kept logits are unchanged
    two = torch.stack([logits[0], logits[0].flip(0)])
    out = filter_top_p(filter_top_k(two, 3), 0.6)
    assert finite(out[:1]) == {1, 3} and finite(out[1:]) == {3, 1}
    assert torch.equal(out[0, [1, 3]], two[0, [1, 3]])
    # and sampling draws only from them
    gen = torch.Generator().manual_seed(0)
    opts = GenerationOptions(temperature=1.0, top_k=3, top_p=0.6)  # top-p sees the tempered probabilities
    drawn = {int(next_tokens(logits.repeat(64, 1), torch.zeros(64, 1, dtype=torch.long), opts, gen)[i])
             for i in range(64)}
    assert drawn == {1, 3}


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.2, 0.1, -0.3, -1.0]])
    context = torch.tensor([[0, 1, 1], [2, 3, 0]])
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(context, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, context, 1.3), theirs)


def _stream(text: str, stop):
    pieces = []
    s = _Stream(TOK, stop, pieces.append)
    for t in TOK.encode(text):
        s.add(t)
        assert not any(x in "".join(pieces) for x in stop)
        if s.done:
            break
    return s.finish(), pieces


def test_stop_strings_are_held_back_until_resolved():
    text, pieces = _stream("hello ST world\nSTOP here", ["STOP"])
    assert text == "hello ST world\n" == "".join(pieces)
    assert pieces[:7] == list("hello ") + ["ST "]  # "S", then "ST", waited until " " ruled out "STOP"
    # a prefix of a stop string that ends the output is shown at the end
    text, pieces = _stream("abc ST", ["STOP"])
    assert text == "abc ST" == "".join(pieces)
    # multi-byte characters appear whole
    text, pieces = _stream("héllo", [])
    assert "".join(pieces) == "héllo" and all("\ufffd" not in p for p in pieces)


def test_bad_options_are_one_error():
    model = _perturbed(MODELS["gpt"]())
    for bad, word in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                      ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"temprature": 1.0}, "Did you mean 'temperature'"), ({"max_new_tokens": 500}, "max_seq_len")]:
        with pytest.raises(LmkitError, match=word):
            generate(model, TOK, "x", **bad)


# --- the verb ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import lmkit.cli
    from lmkit_test_utils import TINY

    run = tmp_path_factory.mktemp("run") / "gpt"
    assert lmkit.cli.main([*TINY, f"hydra.run.dir={run}"]) == 0
    return run


def test_generate_verb_streams_text_from_a_trained_run(run_dir, capsys):
    import lmkit.cli

    capsys.readouterr()
    argv = ["generate", str(run_dir), "prompt=ROMEO:", "max_new_tokens=8", "seed=1"]
    assert lmkit.cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert lmkit.cli.main(argv) == 0
    assert capsys.readouterr().out == first  # the seed reproduces it
    assert lmkit.cli.main(argv + ["cache=static"]) == 0
    assert capsys.readouterr().out == first  # the static cache changes nothing but the shapes
    # several prompts from a file, two samples each, greedy
    prompts = run_dir.parent / "prompts.txt"
    prompts.write_text("ROMEO:\n\nJULIET:\n")
    assert lmkit.cli.main(["generate", str(run_dir), f"prompts_file={prompts}", "max_new_tokens=4",
                           "num_samples=2", "temperature=0", "stop=[\"\\n\\n\"]"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 2 ===" in out and out.count("--- sample 2 ---") == 2 and "JULIET:" in out


def test_generate_from_the_api_equals_the_verb(run_dir, capsys):
    import lmkit.cli
    from lmkit.generation import generate as api_generate, load_for_generation

    model, tokenizer, info = load_for_generation(run_dir)
    texts = api_generate(model, tokenizer, ["ROMEO:"], max_new_tokens=8, seed=1, **info)
    capsys.readouterr()
    assert lmkit.cli.main(["generate", str(run_dir), "prompt=ROMEO:", "max_new_tokens=8", "seed=1"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + texts[0][0] + "\n"


def test_generate_verb_refuses_bad_arguments_in_one_line(run_dir, tmp_path, capsys):
    from lmkit.interop.exporter import export_model
    from lmkit.models.bert import BERT, BERTConfig

    run = str(run_dir)
    _one_error(capsys, ["generate", run, "prompt=x", "temprature=1"], "Did you mean 'temperature'?")
    _one_error(capsys, ["generate", run, "prompt=x", "temperature=-0.5"], "temperature=-0.5")
    _one_error(capsys, ["generate", run, "prompt=x", "top_p=0"], "top_p=0")
    _one_error(capsys, ["generate", run, "prompt=x", "top_p=1.5"], "(0, 1]")
    _one_error(capsys, ["generate", run, "prompt=x", "max_new_tokens=many"], "max_new_tokens=many")
    _one_error(capsys, ["generate", run, "prompt=x", "cache=statik"], "Did you mean 'static'")
    _one_error(capsys, ["generate", run, "prompt=x", "compile=maybe"], "compile=maybe: give true or false")
    _one_error(capsys, ["generate", run], "needs a prompt")
    _one_error(capsys, ["generate", run, "prompt=x", "max_new_tokens=1000"], "max_seq_len=64")
    _one_error(capsys, ["generate", str(tmp_path / "missing"), "prompt=x"], "does not exist")
    export_model(BERT(BERTConfig(**SMALL, max_seq_len=64)), TOK, tmp_path / "bert")
    _one_error(capsys, ["generate", str(tmp_path / "bert"), "prompt=x"], "fill-mask needs [MASK] in the prompt")
    _one_error(capsys, ["generate", str(tmp_path / "bert"), "prompt=a [MASK]", "temperature=1"],
               "temperature do not apply")


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_generate_verb_on_an_exported_encoder_decoder(family, tmp_path, capsys):
    import lmkit.cli
    from lmkit.interop.exporter import export_model

    model = _perturbed(MODELS[family]())
    export_model(model, TOK, tmp_path / "hf")
    capsys.readouterr()
    assert lmkit.cli.main(["generate", str(tmp_path / "hf"), "prompt=hello", "temperature=0",
                           "max_new_tokens=6"]) == 0
    out = capsys.readouterr().out
    ids = TOK.encode("hello")
    ids = [TOK.bos_id, *ids, TOK.eos_id] if family == "bart" else [*ids, TOK.eos_id]
    expected, _ = generate_ids(model, ids, GenerationOptions(max_new_tokens=6, temperature=0), eos_id=TOK.eos_id,
                               decoder_start_id=START[family])
    assert out == TOK.decode(expected[0]) + "\n"


def test_span_marks_in_a_prompt_become_sentinels_and_fills_are_listed():
    from lmkit.generation import encode_prompt, span_fills

    ids = encode_prompt(TOK, "encoder_decoder", "t5", "The <extra_id_0> walks in <extra_id_1> park")
    assert ids == [*b"The ", TOK.sentinel_id(0), *b" walks in ", TOK.sentinel_id(1), *b" park", TOK.eos_id]
    assert encode_prompt(TOK, "encoder_decoder", "bart", "a <mask> b") == [TOK.bos_id, *b"a ", TOK.mask_id, *b" b",
                                                                         TOK.eos_id]
    out = [TOK.sentinel_id(0), *b"cute dog", TOK.sentinel_id(1), *b"the", TOK.sentinel_id(2)]
    assert span_fills(TOK, out) == {"<extra_id_0>": "cute dog", "<extra_id_1>": "the", "<extra_id_2>": ""}
    # an exported T5 decodes such a prompt (the encoder sees the sentinel ids)
    model = _perturbed(MODELS["t5"]())
    texts = generate(model, TOK, "The <extra_id_0> walks", max_new_tokens=5, temperature=0)
    assert isinstance(texts[0], str)


def test_fill_mask_equals_transformers_masked_lm(tmp_path, capsys):
    """An encoder fills each [MASK] with its top-k tokens: the probabilities of BertForMaskedLM on the export."""
    import lmkit.cli
    from lmkit.generation import fill_mask
    from lmkit.interop.exporter import export_model
    from lmkit.models.bert import BERT, BERTConfig

    transformers = pytest.importorskip("transformers")
    model = _perturbed(BERT(BERTConfig(**SMALL, max_seq_len=64))).eval()
    export_model(model, TOK, tmp_path / "bert")
    prompt = "to be [MASK] not to [MASK]"
    ours = fill_mask(model, TOK, prompt, top_k=4)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "bert").eval()
    ids = [TOK.special_id("[CLS]"), *b"to be ", TOK.mask_id, *b" not to ", TOK.mask_id, TOK.special_id("[SEP]")]
    with torch.no_grad():
        probs = hf(torch.tensor([ids])).logits[0].softmax(-1)
    for candidates, position in zip(ours, [i for i, t in enumerate(ids) if t == TOK.mask_id]):
        top = probs[position].topk(4)
        assert [text for text, _ in candidates] == [TOK.decode([int(t)]) for t in top.indices]
        assert [p for _, p in candidates] == pytest.approx(top.values.tolist(), abs=1e-5)
    capsys.readouterr()
    assert lmkit.cli.main(["generate", str(tmp_path / "bert"), f"prompt={prompt}", "top_k=4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[MASK] 1: ") and lines[1].startswith("[MASK] 2: ")
    assert f"{ours[0][0][0]!r} {ours[0][0][1]:.3f}" in lines[0]


def test_t5_fills_are_listed_after_the_text():
    import io

    from lmkit.commands.generate import _write_fills

    out = io.StringIO()
    text = TOK.decode([TOK.sentinel_id(0), *b"quick", TOK.sentinel_id(1), *b"the"])
    _write_fills(None, TOK, {"architecture": "t5"}, "The <extra_id_0> fox, <extra_id_1> dog", text, out)
    assert out.getvalue() == "<extra_id_0>: quick\n<extra_id_1>: the\n"
    _write_fills(None, TOK, {"architecture": "bart"}, "a <mask> b", text, out)  # BART prints its text only
    assert out.getvalue().count("\n") == 2
