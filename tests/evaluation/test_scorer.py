"""Scorer and corpus scoring against brute force: batched + padded log-likelihoods equal one request at a
time, sliding windows tile the corpus once and with stride 1 equal full-context scoring, pseudo-perplexity."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkit.evaluation.corpus import score_decoder, score_pseudo_perplexity, sliding_windows
from lmkit.evaluation.scorer import Scorer
from lmkit.models.bart import BART, BARTConfig
from lmkit.models.bert import BERT, BERTConfig
from lmkit.models.gpt import GPT, GPTConfig
from lmkit.models.llama import Llama, LlamaConfig
from lmkit.models.t5 import T5, T5Config
from lmkit.tokenizers.byte import ByteTokenizer

TOK = ByteTokenizer(num_sentinels=4)
SMALL = dict(n_layer=2, n_head=2, d_model=32, vocab_size=TOK.vocab_size)
MODELS = {
    "gpt": lambda: GPT(GPTConfig(**SMALL, max_seq_len=48)),
    "llama": lambda: Llama(LlamaConfig(**SMALL, n_kv_head=1, max_seq_len=48)),
    "t5": lambda: T5(T5Config(**SMALL, num_buckets=8, max_distance=16)),
    "bart": lambda: BART(BARTConfig(**SMALL, max_seq_len=64)),
}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # sharper distributions than the init, so greedy checks mean something
        for p in model.parameters():
            p.mul_(3.0 if p.ndim > 1 else 1.0)
    return model.eval()


def _brute(model, scorer, context, continuation):
    """One request alone, no padding: Σ log p(continuation | context) and greedy-ness."""
    with torch.no_grad():
        if model.kind == "decoder":
            whole = torch.tensor([(context + continuation)[-(scorer.max_length + 1):]])
            logp = F.log_softmax(model.logits(model(whole[:, :-1])).float(), -1)[0, -len(continuation):]
        else:
            src = torch.tensor([context])
            dec = torch.tensor([[scorer.decoder_start_id] + continuation[:-1]])
            logp = F.log_softmax(model.logits(model.decode(dec, model.encode(src))).float(), -1)[0]
    target = torch.tensor(continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_padded_loglikelihoods_equal_one_request_at_a_time(name):
    model = _model(name)
    scorer = Scorer(model, TOK, name, batch_size=3, max_length=40)
    rnd = random.Random(0)
    requests = []
    for _ in range(7):  # lengths differ, so rows are padded; the last request is cut to max_length
        context = [rnd.randrange(256) for _ in range(rnd.randrange(1, 20))]
        requests.append((context, [rnd.randrange(256) for _ in range(rnd.randrange(1, 6))]))
    requests.append(([rnd.randrange(256) for _ in range(60)], [1, 2, 3]))
    for _ in range(2):  # choices of one question: one context, continuations of 1..5 tokens (run as a group)
        context = [rnd.randrange(256) for _ in range(rnd.randrange(3, 20))]
        requests += [(context, [rnd.randrange(256) for _ in range(k)]) for k in (1, 5, 2, 1)]
    got = scorer.loglikelihood_tokens(requests)
    scorer.share_prefixes = False
    alone = scorer.loglikelihood_tokens(requests)
    assert [ll for ll, _ in alone] == pytest.approx([ll for ll, _ in got], abs=1e-4)
    assert [g for _, g in alone] == [g for _, g in got]
    for (context, continuation), (ll, greedy) in zip(requests, got):
        if model.kind == "encoder_decoder":
            context = context[-scorer.max_length:]
        want_ll, want_greedy = _brute(model, scorer, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_is_true_exactly_for_the_argmax_continuation():
    model = _model("gpt")
    scorer = Scorer(model, TOK, "gpt", max_length=40)
    context = [TOK.eos_id] + TOK.encode("ROMEO: ")
    with torch.no_grad():
        best = int(model.logits(model(torch.tensor([context])))[0, -1].argmax())
    (_, yes), (_, no) = scorer.loglikelihood_tokens([(context, [best]), (context, [(best + 1) % 256])])
    assert yes and not no


def test_pairs_split_as_lm_eval_splits_them():
    scorer = Scorer(_model("gpt"), TOK, "gpt")
    context, continuation = scorer.encode_pair("Question: 2+2? Answer: ", "4")
    assert context == [TOK.eos_id] + TOK.encode("Question: 2+2? Answer:")  # trailing space moved, <eos> first
    assert continuation == TOK.encode(" 4")
    t5 = Scorer(_model("t5"), TOK, "t5")
    assert t5.encode_pair("hi", " there") == (TOK.encode("hi") + [TOK.eos_id], TOK.encode(" there"))


@pytest.mark.parametrize("n,length,stride", [(2, 8, 8), (50, 8, 8), (50, 8, 3), (51, 10, 1), (9, 16, 5)])
def test_sliding_windows_score_every_target_once_within_the_window(n, length, stride):
    seen = []
    for start, first, end in sliding_windows(n, length, stride):
        assert end - 1 - start <= length and start <= first - 1  # inputs fit; each target has its context
        assert end - first <= stride
        seen.extend(range(first, end))
    assert seen == list(range(1, n))


def test_stride_one_equals_scoring_each_token_with_its_full_context():
    model = _model("gpt")
    scorer = Scorer(model, TOK, "gpt", batch_size=5, max_length=12)
    stream = np.array([TOK.eos_id] + TOK.encode("To be, or not to be: that is the question."), dtype=np.int64)
    lengths = np.asarray(TOK.token_byte_lengths())
    score = score_decoder(scorer, stream, lengths, stride=1)
    want = 0.0
    with torch.no_grad():
        for j in range(1, len(stream)):
            ctx = torch.tensor(stream[max(0, j - 12):j])[None]
            want -= float(F.log_softmax(model.logits(model(ctx))[0, -1].float(), -1)[stream[j]])
    assert score.tokens == len(stream) - 1 and score.bytes == len(stream) - 1
    assert score.nll == pytest.approx(want, rel=1e-5)
    # stride = window: disjoint windows, target j sees its window's tokens only; the last, shorter window
    # starts earlier so that its targets keep a full window of context
    disjoint = score_decoder(scorer, stream, lengths, stride=12)
    want = 0.0
    with torch.no_grad():
        for j in range(1, len(stream)):
            end = min(1 + 12 * ((j - 1) // 12 + 1), len(stream))
            ctx = torch.tensor(stream[max(0, end - 13):j])[None]
            want -= float(F.log_softmax(model.logits(model(ctx))[0, -1].float(), -1)[stream[j]])
    assert disjoint.tokens == score.tokens and disjoint.nll == pytest.approx(want, rel=1e-5)
    assert score.metrics()["bits_per_byte"] == pytest.approx(score.nll / (score.bytes * math.log(2)))


def test_pseudo_perplexity_masks_each_token_in_turn():
    torch.manual_seed(0)
    model = BERT(BERTConfig(**SMALL, max_seq_len=32)).eval()
    tokens = np.array(TOK.encode("a short line"), dtype=np.int64)
    lengths = np.asarray(TOK.token_byte_lengths())
    score = score_pseudo_perplexity(model, TOK, tokens, seq_len=8, batch_size=4, byte_lengths=lengths)
    want = 0.0
    with torch.no_grad():
        for b in range(0, len(tokens), 6):
            row = [TOK.cls_id, *tokens[b:b + 6].tolist(), TOK.sep_id]
            for i in range(1, len(row) - 1):
                masked = list(row)
                masked[i] = TOK.mask_id
                logits = model.logits(model(torch.tensor([masked])))[0, i].float()
                want -= float(F.log_softmax(logits, -1)[row[i]])
    assert score.tokens == len(tokens) and score.nll == pytest.approx(want, rel=1e-5)


def test_an_encoder_cannot_be_given_continuations_to_score():
    from lmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder"):
        Scorer(BERT(BERTConfig(**SMALL, max_seq_len=32)), TOK, "bert")
