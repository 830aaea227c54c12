"""Each objective's collator output (shapes, keys, consistency with the reference) and its loss
on a tiny model of its natural architecture. The noise statistics are tested in tests/noise."""
from __future__ import annotations

import pytest
import torch
from objective_helpers import byte_tokenizer, gen, text_blocks, tiny_model

from lmkit.errors import ConfigError
from lmkit.noise import reconstruct
from lmkit.objectives._common import frame, sentence_end_tables, sentence_ends
from lmkit.objectives.base import IGNORE_INDEX

TOK = byte_tokenizer(64)


def _attached(obj, model):
    obj.attach(model)
    return obj


def _finite_loss(obj, model, batch):
    out = obj.loss(model, batch)
    assert torch.isfinite(out.loss_sum) and out.n_targets.item() == obj.count_targets(batch).item() > 0
    out.loss_sum.backward()
    return out


# -- mlm ----------------------------------------------------------------------------------------------
def test_mlm_frames_blocks_and_labels_only_the_selected_positions():
    from lmkit.objectives.mlm import MLM, MLMConfig

    obj = MLM(MLMConfig(), TOK)
    assert obj.block_layout(64) == (62, 62)
    blocks = text_blocks(16, 62)
    b = obj.make_collator()(blocks, gen())
    framed = frame(blocks, TOK.cls_id, TOK.sep_id)
    for key in ("input_ids", "labels", "padding_mask", "token_type_ids"):
        assert b[key].shape == (16, 64), key
    assert (b["input_ids"][:, 0] == TOK.cls_id).all() and (b["input_ids"][:, -1] == TOK.sep_id).all()
    sel = b["labels"] != IGNORE_INDEX
    assert torch.equal(b["labels"][sel], framed[sel])  # labels hold the original token ...
    assert torch.equal(b["input_ids"][~sel], framed[~sel])  # ... and only selected tokens are corrupted
    assert not sel[:, 0].any() and not sel[:, -1].any()  # never [CLS]/[SEP]
    assert (sel.sum(1) == round(0.15 * 62)).all()  # BERT's exact count
    assert (b["input_ids"][sel] == TOK.mask_id).float().mean() > 0.5

    model = tiny_model("bert", TOK.vocab_size)
    out = _finite_loss(_attached(obj, model), model, b)
    assert not any(p.requires_grad for p in model.pooler.parameters())  # unused by MLM: frozen (DDP-safe)
    with torch.no_grad():  # the head runs on the selected rows only, and gives the full-logits loss there
        full = torch.nn.functional.cross_entropy(model.logits(obj.encode(model, b)).flatten(0, 1), b["labels"].flatten(),
                                                 reduction="sum")
    torch.testing.assert_close(out.loss_sum.detach(), full, rtol=1e-5, atol=1e-4)
    logits = model.logits(model(b["input_ids"]))
    ref = torch.nn.functional.cross_entropy(logits[sel], framed[sel])
    assert (out.loss_sum / out.n_targets).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("opts", [{"mode": "roberta"}, {"mode": "bernoulli"}, {"whole_word": True}])
def test_mlm_variants(opts):
    from lmkit.objectives.mlm import MLM, MLMConfig

    obj = MLM(MLMConfig(**opts), TOK)
    blocks = text_blocks(16, 62, seed=1)
    b = obj.make_collator()(blocks, gen(1))
    sel = b["labels"] != IGNORE_INDEX
    assert 0 < sel.sum() < sel.numel() * 0.3
    if opts.get("whole_word"):
        framed = frame(blocks, TOK.cls_id, TOK.sep_id)
        word = TOK.word_starts(framed).long().cumsum(1)
        for r in range(16):  # a word (its non-space tokens) is selected whole or not at all
            letters = ~torch.isin(framed[r], torch.tensor([9, 10, 13, 32, TOK.cls_id, TOK.sep_id]))
            for w in word[r][sel[r]].unique():
                in_word = (word[r] == w) & letters
                assert sel[r][in_word].all()


# -- nsp / sop ----------------------------------------------------------------------------------------
def _segments(b, r):
    ids = torch.where(b["labels"][r] != IGNORE_INDEX, b["labels"][r], b["input_ids"][r])  # undo the masking
    seps = (ids == TOK.sep_id).nonzero().flatten().tolist()
    assert ids[0] == TOK.cls_id and len(seps) == 2 and seps[1] == len(ids) - 1
    tt = b["token_type_ids"][r]
    assert (tt[: seps[0] + 1] == 0).all() and (tt[seps[0] + 1:] == 1).all()
    return ids[1:seps[0]], ids[seps[0] + 1:seps[1]]


def _contains(row: torch.Tensor, seg: torch.Tensor) -> bool:
    return any(torch.equal(row[o:o + len(seg)], seg) for o in range(len(row) - len(seg) + 1))


def test_nsp_pairs_true_next_or_a_segment_of_another_block():
    from lmkit.objectives.sentence_pair import NSPConfig, SentencePair

    obj = SentencePair(NSPConfig(), TOK)
    assert obj.block_layout(64) == (61, 61)
    blocks = text_blocks(32, 61, seed=2)
    b = obj.make_collator()(blocks, gen(2))
    assert b["input_ids"].shape == (32, 64) and b["pair_labels"].shape == (32,)
    labels = b["pair_labels"].tolist()
    assert 0 < sum(labels) < 32
    for r in range(32):
        a, nxt = _segments(b, r)
        assert len(a) >= 1 and len(nxt) >= 1
        assert torch.equal(a, blocks[r, :len(a)])
        if labels[r] == 0:
            assert torch.equal(nxt, blocks[r, len(a):])
        else:
            assert any(_contains(blocks[q], nxt) for q in range(32) if q != r)

    model = tiny_model("bert", TOK.vocab_size)
    out = _finite_loss(_attached(obj, model), model, b)
    assert set(out.logs) == {"mlm_loss", "nsp_loss", "nsp_acc"}
    total = (out.loss_sum / out.n_targets).item()  # MLM mean + NSP mean, as BERT
    assert total == pytest.approx((out.logs["mlm_loss"] + out.logs["nsp_loss"]).item(), rel=1e-5)
    assert model.pooler.dense.weight.grad is not None  # the classifier reads the pooled [CLS]


def test_nsp_needs_two_blocks_per_micro_batch():
    from lmkit.objectives.sentence_pair import NSPConfig, SentencePair

    obj = SentencePair(NSPConfig(negative_prob=1.0), TOK)
    with pytest.raises(ConfigError, match="data.batch_size >= 2"):
        obj.make_collator()(text_blocks(1, 61), gen())


def test_sop_negatives_are_the_two_segments_swapped():
    from lmkit.objectives.sentence_pair import SentencePair, SOPConfig

    obj = SentencePair(SOPConfig(), TOK)
    blocks = text_blocks(32, 61, seed=3)
    b = obj.make_collator()(blocks, gen(3))
    labels = b["pair_labels"].tolist()
    assert 0 < sum(labels) < 32
    for r in range(32):
        first, second = _segments(b, r)
        joined = torch.cat([second, first]) if labels[r] else torch.cat([first, second])
        assert torch.equal(joined, blocks[r])

    model = tiny_model("albert", TOK.vocab_size, embedding_size=16)
    out = _finite_loss(_attached(obj, model), model, b)
    assert {"sop_loss", "sop_acc", "mlm_loss"} == set(out.logs)


def test_sentence_pair_needs_a_pooler():
    from lmkit.objectives.sentence_pair import NSPConfig, SentencePair

    with pytest.raises(ConfigError, match="pooled"):
        SentencePair(NSPConfig(), TOK).attach(tiny_model("t5", TOK.vocab_size))


# -- span_bert ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "albert"])
def test_span_bert_boundaries_and_mlm_plus_sbo_loss(arch):
    from lmkit.objectives.span_bert import SpanBERT, SpanBERTConfig

    obj = SpanBERT(SpanBERTConfig(), TOK)
    blocks = text_blocks(8, 126, seed=4)
    b = obj.make_collator()(blocks, gen(4))
    assert b["input_ids"].shape == (8, 128)
    masked = b["labels"] != IGNORE_INDEX
    sbo = b["span_left"] >= 0
    assert sbo.any() and (masked | ~sbo).all()
    rows, cols = sbo.nonzero(as_tuple=True)
    left, right, pos = b["span_left"][rows, cols], b["span_right"][rows, cols], b["span_pos"][rows, cols]
    assert (left < cols).all() and (cols < right).all() and (pos == cols - left - 1).all()
    assert not masked[rows, left].any() and not masked[rows, right].any()  # boundaries are outside the span

    extra = {"embedding_size": 16} if arch == "albert" else {}
    model = tiny_model(arch, TOK.vocab_size, **extra)
    out = _finite_loss(_attached(obj, model), model, b)
    assert set(out.logs) == {"mlm_loss", "sbo_loss"} and out.logs["sbo_loss"] > 0
    assert obj.sbo.mlp[0].weight.grad is not None


# -- span_corruption ----------------------------------------------------------------------------------
def test_span_corruption_inputs_are_exactly_seq_len_with_descending_sentinels():
    from lmkit.objectives.span_corruption import SpanCorruption, SpanCorruptionConfig, corrupted_lengths, raw_length

    cfg = SpanCorruptionConfig()
    assert SpanCorruption.sentinels_needed(cfg, 128) == 7
    obj = SpanCorruption(cfg, TOK)
    assert obj.block_layout(128) == (141, 141)  # T5's random_spans_helper: 128 inputs <- 141 raw, 29 targets
    assert raw_length(cfg, 512) == 568
    for seq_len in (16, 32, 64, 100, 256):
        assert corrupted_lengths(raw_length(cfg, seq_len), 0.15, 3.0)[0] == seq_len
    blocks = text_blocks(8, 141, seed=5)
    b = obj.make_collator()(blocks, gen(5))
    assert b["input_ids"].shape == (8, 128) and b["padding_mask"].all()
    assert b["labels"].shape == (8, 29) and (b["labels"] != IGNORE_INDEX).all()
    V = TOK.vocab_size
    for seq in (b["input_ids"], b["labels"]):
        assert (seq[:, -1] == TOK.eos_id).all()
        for row in seq:
            sentinels = row[row >= V - TOK.num_sentinels].tolist()
            assert sentinels == [V - 1 - i for i in range(len(sentinels))]  # <extra_id_0> = V-1, counting down
    assert b["labels"][:, 0].eq(V - 1).all()
    assert (b["decoder_input_ids"][:, 0] == TOK.pad_id).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    assert reconstruct(b["input_ids"], b["labels"], obj.vocab) == blocks.tolist()

    model = tiny_model("t5", V)
    out = _finite_loss(obj, model, b)
    assert out.n_targets.item() == 8 * 29  # every target token, sentinels and EOS included


def test_span_corruption_without_room_for_sentinels():
    from lmkit.objectives.span_corruption import SpanCorruption, SpanCorruptionConfig

    obj = SpanCorruption(SpanCorruptionConfig(), byte_tokenizer(num_sentinels=3))
    with pytest.raises(ConfigError, match="needs 7 sentinel tokens .* has 3"):
        obj.block_layout(128)


# -- bart_denoising -----------------------------------------------------------------------------------
def test_bart_denoising_decoder_reconstructs_the_original():
    from lmkit.objectives.bart import BARTDenoising, BARTDenoisingConfig

    obj = BARTDenoising(BARTDenoisingConfig(), TOK)
    assert obj.block_layout(64) == (62, 62)
    blocks = text_blocks(8, 62, seed=6)
    b = obj.make_collator()(blocks, gen(6))
    framed = frame(blocks, TOK.bos_id, TOK.eos_id)
    assert b["input_ids"].shape == (8, 64) and torch.equal(b["labels"], framed)
    assert (b["decoder_input_ids"][:, 0] == TOK.eos_id).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], framed[:, :-1])
    n = b["padding_mask"].sum(1)
    assert (n < 64).all()  # spans collapse to one mask each
    assert (b["input_ids"] == TOK.mask_id).any(1).float().mean() >= 0.5  # 10% of span masks are random tokens
    assert (b["input_ids"][:, 0] == TOK.bos_id).all()
    assert (b["input_ids"].gather(1, (n - 1)[:, None]) == TOK.eos_id).all()

    model = tiny_model("bart", TOK.vocab_size)
    out = _finite_loss(obj, model, b)
    assert out.n_targets.item() == 8 * 64


def test_sentence_ends_byte_and_trained_tokenizers():
    from lmkit.tokenizers.trained import TrainedTokenizer, train_hf_tokenizer

    text = "Stay. Who goes there? Nobody!\nGood night, sweet prince.Next e.g. this"
    expected = ["Stay.", "there?", "Nobody!", "e.g."]
    ids = torch.tensor([TOK.encode(text)])
    ends = sentence_ends(ids, sentence_end_tables(TOK))[0]
    assert [text[:i + 1].split()[-1] for i in ends.nonzero().flatten().tolist()] == expected

    from objective_helpers import corpus_bytes

    corpus = bytes(corpus_bytes().astype("uint8")).decode().split("\n\n")
    bpe = TrainedTokenizer(train_hf_tokenizer("bpe", corpus, 600), "bpe", 2)
    ids = bpe.encode(text)
    ends = sentence_ends(torch.tensor([ids]), sentence_end_tables(bpe))[0].tolist()
    got = [bpe.decode(ids[:i + 1]).split()[-1] for i, e in enumerate(ends) if e]
    assert got == expected


# -- prefix_lm ----------------------------------------------------------------------------------------
def test_prefix_lm_decoder_form():
    from lmkit.noise import prefix_lm_attention_mask
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig

    obj = PrefixLM(PrefixLMConfig(), TOK)
    model = tiny_model("gpt", TOK.vocab_size)
    obj.attach(model)
    assert obj.form == "decoder" and obj.block_layout(32) == (33, 32)
    blocks = text_blocks(8, 33, seed=7)
    b = obj.make_collator()(blocks, gen(7))
    s = b["prefix_len"]
    assert b["input_ids"].shape == (8, 32) and "attn_mask" not in b  # built from prefix_len where it is used
    assert ((s >= 1) & (s <= 32)).all()
    assert torch.equal((b["labels"] != IGNORE_INDEX).sum(1), 33 - s)  # only the rest is predicted
    mask = prefix_lm_attention_mask(s, 32)
    for r in range(8):  # the prefix is bidirectional, the rest causal
        m = mask[r]
        assert m[0, : s[r]].all() and not m[s[r], s[r] + 1:].any()
    _finite_loss(obj, model, b)
    # the loss is that of the model run with the dense mask
    with torch.no_grad():
        hidden = model(b["input_ids"], padding_mask=b["padding_mask"], attn_mask=mask)
        expected = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), b["labels"].flatten(),
                                                     reduction="sum")
        torch.testing.assert_close(obj.loss(model, b).loss_sum, expected)


def test_prefix_lm_encoder_decoder_form_and_form_checks():
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig

    obj = PrefixLM(PrefixLMConfig(), TOK)
    model = tiny_model("t5", TOK.vocab_size)
    obj.attach(model)  # auto -> the model's kind
    assert obj.form == "encoder_decoder" and obj.block_layout(32) == (32, 32)
    blocks = text_blocks(8, 32, seed=8)
    b = obj.make_collator()(blocks, gen(8))
    s = b["prefix_len"]
    for r in range(8):
        assert b["input_ids"][r, : s[r]].tolist() == blocks[r, : s[r]].tolist()
        assert b["input_ids"][r, s[r]] == TOK.eos_id
        rest = b["labels"][r][b["labels"][r] != IGNORE_INDEX].tolist()
        assert rest == blocks[r, s[r]:].tolist() + [TOK.eos_id]
    _finite_loss(obj, model, b)
    with pytest.raises(ConfigError, match="objective.form=decoder does not fit model kind encoder_decoder"):
        PrefixLM(PrefixLMConfig(form="decoder"), TOK).attach(model)


# -- ul2 ----------------------------------------------------------------------------------------------
def test_ul2_mode_tokens_and_lengths():
    from lmkit.objectives.ul2 import UL2, UL2Config

    cfg = UL2Config()
    tok = byte_tokenizer(UL2.sentinels_needed(cfg, 64))
    obj = UL2(cfg, tok)
    length, _ = obj.block_layout(64)
    assert length == 63  # S (prefix LM) inputs: mode + up to 62 prefix tokens + EOS
    blocks = text_blocks(32, length, seed=9)
    b = obj.make_collator()(blocks, gen(9))
    assert b["input_ids"].shape[1] <= 64
    modes = {"R": tok.special_id("[NLU]"), "X": tok.special_id("[NLG]"), "S": tok.special_id("[S2S]")}
    kinds = [cfg.denoisers[i].kind for i in b["denoiser"].tolist()]
    assert len(set(kinds)) == 3
    assert b["input_ids"][:, 0].tolist() == [modes[k] for k in kinds]
    for r in range(32):
        tgt = b["labels"][r][b["labels"][r] != IGNORE_INDEX]
        assert tgt[-1] == tok.eos_id
    assert torch.equal(b["decoder_padding_mask"], b["labels"] != IGNORE_INDEX)
    model = tiny_model("t5", tok.vocab_size)
    _finite_loss(obj, model, b)
    with pytest.raises(ConfigError, match="sentinel"):
        UL2(cfg, byte_tokenizer(0)).block_layout(64)


@pytest.mark.parametrize("factory, cfg_name, seq_len", [
    ("lmkit.objectives.mlm:MLM", "lmkit.objectives.mlm:MLMConfig", 2),
    ("lmkit.objectives.sentence_pair:SentencePair", "lmkit.objectives.sentence_pair:NSPConfig", 4),
    ("lmkit.objectives.span_bert:SpanBERT", "lmkit.objectives.span_bert:SpanBERTConfig", 4),
    ("lmkit.objectives.bart:BARTDenoising", "lmkit.objectives.bart:BARTDenoisingConfig", 3),
    ("lmkit.objectives.span_corruption:SpanCorruption", "lmkit.objectives.span_corruption:SpanCorruptionConfig", 2),
    ("lmkit.objectives.ul2:UL2", "lmkit.objectives.ul2:UL2Config", 3),
])
def test_sequences_too_short_to_corrupt(factory, cfg_name, seq_len):
    import importlib

    def load(spec):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)

    obj = load(factory)(load(cfg_name)(), TOK)
    with pytest.raises(ConfigError, match=f"data.seq_len={seq_len} is too short"):
        obj.block_layout(seq_len)


def test_collators_are_picklable_for_dataloader_workers():
    import pickle

    from lmkit.objectives.bart import BARTDenoising, BARTDenoisingConfig
    from lmkit.objectives.mlm import MLM, MLMConfig
    from lmkit.objectives.prefix_lm import PrefixLM, PrefixLMConfig
    from lmkit.objectives.sentence_pair import NSPConfig, SentencePair
    from lmkit.objectives.span_bert import SpanBERT, SpanBERTConfig
    from lmkit.objectives.span_corruption import SpanCorruption, SpanCorruptionConfig
    from lmkit.objectives.ul2 import UL2, UL2Config

    blocks = text_blocks(4, 61, seed=10)
    for obj in (MLM(MLMConfig(whole_word=True), TOK), SentencePair(NSPConfig(), TOK), SpanBERT(SpanBERTConfig(), TOK),
                SpanCorruption(SpanCorruptionConfig(), TOK), BARTDenoising(BARTDenoisingConfig(), TOK),
                PrefixLM(PrefixLMConfig(), TOK), UL2(UL2Config(), TOK)):
        collate = obj.make_collator()
        again = pickle.loads(pickle.dumps(collate))
        a, b = collate(blocks, gen(3)), again(blocks, gen(3))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), type(obj).__name__
