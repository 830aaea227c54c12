"""The sft objective: targets, masks and packing against brute-force constructions from the segments."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmkit.data.datamodule import split_tokens
from lmkit.data.sft import SFTFormat, SFTSource, shakespeare_speeches
from lmkit.errors import ConfigError, DataError
from lmkit.objectives.base import IGNORE_INDEX
from lmkit.objectives.sft import SFT, SFTConfig, prompt_ids, seq2seq_attention
from lmkit.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer()
NLU, S2S, EOS, PAD, MASK = (TOK.special_id("[NLU]"), TOK.special_id("[S2S]"), TOK.eos_id, TOK.pad_id, TOK.mask_id)
RECORDS = [
    {"prompt": "ROMEO", "response": "But soft!"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A one."}, {"role": "user", "content": "Q2"},
                  {"role": "assistant", "content": "A2"}]},
    {"prompt": "", "response": "No prompt at all."},
    {"prompt": "JULIET", "response": "Ay me."},
    {"prompt": "A long title here", "response": "x" * 12},
    {"prompt": "NURSE", "response": "Madam!"},
]
SEQ = 40


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def brute_examples(records, template="{prompt}\n"):
    """Each example as (tokens, is_target, prompt_segment) lists, built turn by turn from the records.

    ``prompt_segment``: the turn number for tokens of a prompt ([NLU] .. [S2S]), -1 elsewhere.
    """
    out = []
    for r in records:
        if "messages" in r:
            turns, prompt = [], ""
            for m in r["messages"]:
                if m["role"] == "assistant":
                    turns.append((prompt, m["content"]))
                    prompt = ""
                else:
                    prompt += template.replace("{prompt}", m["content"])
        else:
            turns = [(template.replace("{prompt}", r["prompt"]), r["response"])]
        toks, target, seg = [], [], []
        for t, (p, resp) in enumerate(turns):
            part = [NLU] + TOK.encode(p) + [S2S]
            toks += part
            target += [t > 0] + [False] * (len(part) - 1)  # a later turn's [NLU] ends the previous response
            seg += [t] * len(part)
            toks += TOK.encode(resp)
            target += [True] * len(TOK.encode(resp))
            seg += [-1] * len(TOK.encode(resp))
        toks.append(EOS)
        target.append(True)
        seg.append(-1)
        out.append((toks, target, seg))
    return out


def brute_rows(examples, row_len):
    """Greedy packing in order: (tokens, is_target, prompt segment, example number) per row, pads at the end."""
    rows, cur = [], []
    for i, ex in enumerate(examples):
        if sum(len(e[0]) for _, e in cur) + len(ex[0]) > row_len:
            rows.append(cur)
            cur = []
        cur.append((i, ex))
    rows.append(cur)
    result = []
    for row in rows:
        toks, target, seg, doc = [], [], [], []
        for i, (t, g, s) in row:
            toks += t
            target += g
            seg += s
            doc += [i] * len(t)
        n = row_len - len(toks)
        result.append((toks + [PAD] * n, target + [False] * n, seg + [-1] * n, doc + [-2] * n))
    return result


@pytest.fixture
def data(tmp_path):
    src = SFTSource(SFTFormat(), SEQ, 0.0, files=[write_jsonl(tmp_path / "d.jsonl", RECORDS)])
    tokens = src.token_array(TOK)
    rows = brute_rows(brute_examples(RECORDS), SEQ)
    return torch.from_numpy(tokens.astype(np.int64)).view(-1, SEQ), rows


def objective(kind, **cfg):
    obj = SFT(SFTConfig(**cfg), TOK)
    obj.kind = kind
    return obj


def test_rows_are_the_greedy_packing_of_whole_examples(data):
    blocks, rows = data
    assert blocks.tolist() == [r[0] for r in rows]
    assert len(rows) >= 3  # several examples share a row, and rows break between examples


def test_decoder_labels_token_by_token(data):
    blocks, rows = data
    batch = objective("decoder").make_collator()(blocks, torch.Generator().manual_seed(0))
    for b, (toks, target, _, doc) in enumerate(rows):
        expected = [toks[j + 1] if target[j + 1] else IGNORE_INDEX for j in range(SEQ - 1)]
        assert batch["labels"][b].tolist() == expected
        assert batch["input_ids"][b].tolist() == toks[:-1]
    # what is learned: every response token and the token ending it (<eos>, or [NLU] mid-conversation)
    learned = [t for b, r in enumerate(rows) for t, g in zip(r[0], r[1]) if g]
    assert learned.count(EOS) == len(RECORDS) and learned.count(NLU) == 1 and S2S not in learned


def test_encoder_masks_response_tokens_only(data):
    blocks, rows = data
    gen = torch.Generator().manual_seed(3)
    batch = objective("encoder", mask_prob=0.5).make_collator()(blocks, gen)
    draw = torch.rand(blocks.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    for b, (toks, target, _, _) in enumerate(rows):
        chosen = [g and bool(d) for g, d in zip(target, draw[b])]
        assert batch["labels"][b].tolist() == [t if c else IGNORE_INDEX for t, c in zip(toks, chosen)]
        assert batch["input_ids"][b].tolist() == [MASK if c else t for t, c in zip(toks, chosen)]
    assert 0 < (batch["labels"] != IGNORE_INDEX).sum() < sum(sum(r[1]) for r in rows)


def test_unilm_mask_against_brute_force(data):
    blocks, rows = data
    mask = seq2seq_attention(blocks, (NLU, S2S, EOS))
    for b, (toks, _, seg, doc) in enumerate(rows):
        expected = [[doc[q] == doc[k] and (k <= q or (seg[q] >= 0 and seg[q] == seg[k])) for k in range(SEQ)]
                    for q in range(SEQ)]
        assert mask[b].tolist() == expected


def test_unilm_mask_of_one_example_is_unilm_seq2seq():
    """One example at the start of a row: segment A = [NLU] prompt [S2S] (noise.unilm_mask, UniLM's seq2seq)."""
    from lmkit.noise.prefix_lm import unilm_mask

    ids = prompt_ids(TOK, SFTFormat(), "TITLE") + TOK.encode("body text") + [EOS]
    row = torch.tensor([ids])
    a = len(prompt_ids(TOK, SFTFormat(), "TITLE"))
    assert torch.equal(seq2seq_attention(row, (NLU, S2S, EOS)), unilm_mask("seq2seq", len(ids), segment_a_len=torch.tensor([a])))


def test_encoder_decoder_one_example_per_row(data):
    blocks, rows = data
    batch = objective("encoder_decoder").make_collator()(blocks, torch.Generator())
    sources, targets = [], []
    for r in RECORDS:  # the encoder reads everything up to the last [S2S]; the decoder learns the last response
        (toks, _, _), = brute_examples([r])
        cut = len(toks) - 1 - toks[::-1].index(S2S) + 1
        sources.append(toks[:cut])
        targets.append(toks[cut:])
    assert [row[m].tolist() for row, m in zip(batch["input_ids"], batch["padding_mask"])] == sources
    assert [[t for t in row.tolist() if t != IGNORE_INDEX] for row in batch["labels"]] == targets
    assert batch["decoder_input_ids"][:, 0].eq(PAD).all()


def tiny_model(kind):
    from lmkit.models.bert import BERT, BERTConfig
    from lmkit.models.gpt import GPT, GPTConfig
    from lmkit.models.t5 import T5, T5Config

    torch.manual_seed(0)
    small = dict(vocab_size=TOK.vocab_size, d_model=32, n_layer=1, n_head=2, dropout=0.0)
    if kind == "decoder":
        return GPT(GPTConfig(max_seq_len=64, **small)).eval()
    if kind == "encoder":
        return BERT(BERTConfig(max_seq_len=64, **small)).eval()
    return T5(T5Config(**{k: v for k, v in small.items() if k != "n_layer"}, n_layer=1)).eval()


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_packed_loss_equals_each_example_alone(data, kind):
    """No attention across packed examples: the packed row's loss is the sum of each example's own."""
    blocks, rows = data
    obj, model = objective(kind, mask_prob=0.5), tiny_model(kind)
    batch = obj.make_collator()(blocks, torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = obj.loss(model, batch)
        total, count = torch.zeros(()), 0
        for b, (toks, _, _, doc) in enumerate(rows):
            for d in sorted(set(doc) - {-2}):
                span = [j for j in range(SEQ) if doc[j] == d]
                lo, hi = span[0], span[-1] + 1
                if kind == "decoder":
                    alone = {"input_ids": blocks[b:b + 1, lo:hi - 1], "labels": batch["labels"][b:b + 1, lo:hi - 1],
                             "document_ids": torch.zeros(1, hi - 1 - lo, dtype=torch.int32)}
                else:
                    row = blocks[b:b + 1, lo:hi]
                    alone = {"input_ids": batch["input_ids"][b:b + 1, lo:hi], "labels": batch["labels"][b:b + 1, lo:hi],
                             "attn_mask": seq2seq_attention(row, (NLU, S2S, EOS)),
                             "document_ids": torch.zeros(1, hi - lo, dtype=torch.int32)}
                out = obj.loss(model, alone)
                total, count = total + out.loss_sum, count + int(out.n_targets)
    assert int(packed.n_targets) == count
    torch.testing.assert_close(packed.loss_sum, total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder_decoder"])
def test_gradient_accumulation_is_exact(data, kind):
    """Two micro-batches of half the rows give the gradients of one full batch (module normalisation)."""
    from lmkit.module import LMModule

    blocks, _ = data
    obj, model = objective(kind), tiny_model(kind)
    collate = obj.make_collator()

    def grads(micro):
        module = LMModule(model, obj, None, None, weight_decay=0.0)
        module.manual_backward = lambda loss: loss.backward()
        model.zero_grad()
        module.forward_backward(micro)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = grads([collate(blocks, torch.Generator().manual_seed(5))])
    half = len(blocks) // 2
    draw = collate(blocks, torch.Generator().manual_seed(5))  # the same masking for the split (encoders)
    split = [{k: v[:half] for k, v in draw.items()}, {k: v[half:] for k, v in draw.items()}]
    if kind == "encoder_decoder":  # one example per row: split the collated examples instead
        n = len(draw["input_ids"]) // 2
        split = [{k: v[:n] for k, v in draw.items()}, {k: v[n:] for k, v in draw.items()}]
    counts = [int(obj.count_targets(mb)) for mb in split]
    assert counts[0] != counts[1]  # unequal halves: a per-micro-batch mean would be wrong
    for a, b in zip(full, grads(split)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- data -------------------------------------------------------------------------------------------
def test_validation_split_starts_on_a_row(tmp_path):
    records = [{"prompt": f"T{i}", "response": "body " * (i % 5 + 1)} for i in range(60)]
    for frac in (0.1, 0.13, 0.3):
        src = SFTSource(SFTFormat(), SEQ, frac, files=[write_jsonl(tmp_path / "v.jsonl", records)])
        tokens = src.token_array(TOK)
        splits = split_tokens(tokens, frac)
        assert len(splits.train) % SEQ == 0 and len(splits.val) >= SEQ
        val_rows = splits.val[: len(splits.val) // SEQ * SEQ].reshape(-1, SEQ)
        assert all(r[0] in (NLU, PAD) for r in val_rows)  # every validation row starts with an example (or is padding)


def test_fingerprint_covers_format_and_layout(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    base = SFTSource(SFTFormat(), SEQ, 0.1, files=[f]).fingerprint()
    assert base == SFTSource(SFTFormat(), SEQ, 0.1, files=[f]).fingerprint()
    for other in (SFTSource(SFTFormat(template="Q: {prompt}\nA: "), SEQ, 0.1, files=[f]),
                  SFTSource(SFTFormat(response_field="answer"), SEQ, 0.1, files=[f]),
                  SFTSource(SFTFormat(), SEQ + 1, 0.1, files=[f]), SFTSource(SFTFormat(), SEQ, 0.2, files=[f]),
                  SFTSource(SFTFormat(), SEQ, 0.1, "skip", files=[f])):
        assert other.fingerprint() != base


def test_template_and_field_names(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"title": "Sonnet", "body": "Shall I"}])
    src = SFTSource(SFTFormat(prompt_field="title", response_field="body", template="Title: {prompt}\nText: "), SEQ,
                    0.0, files=[f])
    row = src.token_array(TOK).tolist()
    assert row[: row.index(EOS) + 1] == [NLU] + TOK.encode("Title: Sonnet\nText: ") + [S2S] + TOK.encode("Shall I") + [EOS]


def test_speeches_of_the_builtin_corpus():
    speeches = shakespeare_speeches()
    assert len(speeches) > 5000
    assert speeches[0] == {"prompt": "First Citizen", "response": "Before we proceed any further, hear me speak.", "line": 1}
    text = (shakespeare_speeches.__globals__["BUILTIN_CORPORA"]["tinyshakespeare"]).read_text().splitlines()
    for s in speeches[:50] + speeches[-50:]:  # "line" is the speaker's line in the corpus
        assert text[s["line"] - 1] == s["prompt"] + ":"


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x"}, "d.jsonl:2: no field 'response'"),
    ({"prompt": "x", "respones": "y"}, "d.jsonl:2: no field 'response'. Did you mean 'objective.response_field=respones'?"),
    ({"prompt": "x", "response": "  "}, "d.jsonl:2: the response ('response') is empty"),
    ({"prompt": "x", "response": 3}, "d.jsonl:2: field 'response' is number, not a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:2: the conversation does not end with a 'assistant'"),
    ({"prompt": "x", "response": "y" * 60}, "d.jsonl:2: the example is 65 tokens long"),
    ("[1, 2]", "d.jsonl:2: the line is a JSON array, not an object"),
    ("{oops", "d.jsonl:2: invalid JSON"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    f = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], record])
    with pytest.raises(DataError) as e:
        SFTSource(SFTFormat(), SEQ, 0.0, files=[f]).token_array(TOK)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overlong_skip_and_truncate(tmp_path, capsys):
    long = {"prompt": "x", "response": "y" * 60}
    f = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], long])
    skipped = SFTSource(SFTFormat(), SEQ, 0.0, "skip", files=[f]).token_array(TOK)
    assert skipped.tolist() == SFTSource(SFTFormat(), SEQ, 0.0, files=[write_jsonl(tmp_path / "e.jsonl", RECORDS[:1])]
                                         ).token_array(TOK).tolist()
    assert "skipped 1 example" in capsys.readouterr().out
    cut = SFTSource(SFTFormat(), SEQ, 0.0, "truncate", files=[f]).token_array(TOK).reshape(-1, SEQ)
    assert cut[1].tolist() == ([NLU] + TOK.encode("x\n") + [S2S] + TOK.encode("y" * 60))[:SEQ]  # no <eos>: cut
    prompt_too_long = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p" * 50, "response": "y"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt alone takes 40 tokens or more"):
        SFTSource(SFTFormat(), SEQ, 0.0, "truncate", files=[prompt_too_long]).token_array(TOK)


def test_bad_options():
    with pytest.raises(ConfigError, match="objective.template must contain {prompt}"):
        SFTConfig(template="no slot")
    with pytest.raises(ConfigError, match="objective.overlong must be one of error, skip, truncate"):
        SFTConfig(overlong="cut")
    with pytest.raises(ConfigError, match="objective.mask_prob must be strictly between 0 and 1"):
        SFTConfig(mask_prob=1.5)


# -- measured: SFT teaches the format of the speaker → speech task ------------------------------------
SPEAKER_HEADER = __import__("re").compile(r"^[A-Z][A-Za-z' ]*:$", __import__("re").M)


def format_rate(path, prompts: list[str], plain: bool = False, budget: int = 200) -> float:
    """Share of sampled responses that follow the format: they end (``<eos>``) within ``budget`` tokens, are not
    empty and hold one speech (no ``NAME:`` line of a next speaker). ``plain``: the prompt as the pretraining text
    (``<eos>NAME:\\n``) instead of the SFT template."""
    from lmkit.generation import GenerationOptions, generate_ids, load_for_generation

    model, tok, _ = load_for_generation(path)
    ok = 0
    for i, p in enumerate(prompts):
        ids = [tok.eos_id] + tok.encode(p + ":\n") if plain else prompt_ids(tok, SFTFormat(), p)
        out, texts = generate_ids(model, ids, GenerationOptions(max_new_tokens=budget, temperature=0.8, seed=i),
                                  tokenizer=tok, eos_id=tok.eos_id)
        ok += len(out[0]) < budget and bool(texts[0].strip()) and not SPEAKER_HEADER.search(texts[0])
    return ok / len(prompts)


@pytest.mark.measure  # minutes; numbers in docs/objectives.md (python -m pytest -m measure)
def test_sft_teaches_the_response_format(tmp_path):
    """Pretrain a tiny GPT on the corpus, then SFT it on speaker → speech pairs (experiment=sft, init_from):
    held-out speakers' responses follow the format far more often than the pretrained model's."""
    from lmkit.api import run

    common = ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.max_seq_len=256",
              "trainer.val_batches=2", "trainer.progress_bar=false", "logger=none", "callbacks=[]"]
    run([*common, "data.seq_len=128", "data.batch_size=16", "trainer.max_steps=300", "scheduler.warmup_steps=10",
         "trainer.val_check_interval=300"], tmp_path / "pre")
    run([*common, "+objective=sft", "experiment=sft", f"init_from={tmp_path / 'pre'}", "data.seq_len=256",
         "objective.overlong=skip", "data.batch_size=8", "trainer.max_steps=150", "optimizer.lr=1e-3",
         "trainer.val_check_interval=150"], tmp_path / "sft")
    # held out: the last speeches of the corpus are in the validation split (the last 10% of the rows)
    held = [s["prompt"] for s in shakespeare_speeches()[-120:] if len(s["prompt"]) + len(s["response"]) + 4 <= 256][-30:]
    tuned = format_rate(tmp_path / "sft", held)
    pretrained = max(format_rate(tmp_path / "pre", held), format_rate(tmp_path / "pre", held, plain=True))
    print(f"format followed: sft {tuned:.2f}, pretrained only {pretrained:.2f}")
    assert tuned >= 0.5 and pretrained <= 0.1


def test_generate_writes_the_prompt_in_the_run_template(tmp_path, capsys, tiny):
    """``lmkit generate`` on an SFT run feeds ``[NLU] template(prompt) [S2S]``, as in training."""
    from lmkit.api import run
    from lmkit.commands.generate import main
    from lmkit.generation import GenerationOptions, generate_ids, load_for_generation
    from lmkit.objectives.sft import run_format

    template = "Speaker: {prompt}\nSpeech: "
    run([*tiny, "+objective=sft", "trainer.max_steps=2", f"objective.template='{template}'", "data.seq_len=64",
         "objective.overlong=skip"], tmp_path / "run")
    assert run_format(tmp_path / "run").template == template
    assert run_format(tmp_path / "run", template="{prompt}?").template == "{prompt}?"
    model, tok, _ = load_for_generation(tmp_path / "run")
    ids = [tok.special_id("[NLU]")] + tok.encode("Speaker: ROMEO\nSpeech: ") + [tok.special_id("[S2S]")]
    _, (expected,) = generate_ids(model, ids, GenerationOptions(max_new_tokens=12, temperature=0), tokenizer=tok,
                                  eos_id=tok.eos_id)
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "prompt=ROMEO", "max_new_tokens=12", "temperature=0"]) == 0
    assert capsys.readouterr().out == f"Speaker: ROMEO\nSpeech: {expected}\n"
    assert main([str(tmp_path / "run"), "prompt=ROMEO", "max_new_tokens=12", "temperature=0", "raw=true"]) == 0
    _, (plain,) = generate_ids(model, [tok.eos_id] + tok.encode("ROMEO"), GenerationOptions(max_new_tokens=12,
                               temperature=0), tokenizer=tok, eos_id=tok.eos_id)
    assert capsys.readouterr().out == f"ROMEO{plain}\n"


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny", "t5_tiny"])
def test_every_kind_trains_from_the_command_line(model, tmp_path, tiny):
    """+objective=sft composes with each kind (its needs met), trains on the built-in speeches, loss falls."""
    from lmkit.api import run

    summary = run([*tiny, f"model={model}", "+objective=sft", "data.seq_len=64", "objective.overlong=skip",
                   "trainer.max_steps=3", "trainer.val_check_interval=3", "optimizer.lr=3e-3"], tmp_path)
    start, end = summary["start"]["val/loss"], summary["end"]["val/loss"]
    assert end < start, (start, end)


@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder_decoder"])
def test_rows_without_responses_have_no_targets(kind):
    """Plain text (no markers: a corpus scored by evaluate) and padding rows give no target and no error."""
    rows = torch.tensor([TOK.encode("plain text, no example") + [EOS] + [PAD] * 5, [PAD] * 28])
    batch = objective(kind).make_collator()(rows, torch.Generator().manual_seed(0))
    assert (batch["labels"] == IGNORE_INDEX).all()
