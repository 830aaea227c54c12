"""Exported tokenizers: AutoTokenizer gives lmkit's ids on any text (specials and sentinels included),
and the directory imports back to the same lmkit tokenizer."""
from __future__ import annotations

import pytest
from interop_helpers import transformers

from lmkit.interop.tokenizer import load_tokenizer_dir, tokenizer_files
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import TrainedTokenizer, train_hf_tokenizer

TEXTS = [
    "Hello world, this is a test.", "  leading spaces\tand tabs\n\nnewlines  ", "a\r\nb\x0bc\x0cd",
    "ünïcödé — 日本語のテキスト, ελληνικά, русский", "emoji 🙂🚀 and a family 👩‍👩‍👧 (zero-width joiners)",
    "special tokens in text: [MASK] <pad><eos> [CLS] x [SEP] <bos> <unk> [NLU] [NLG] [S2S]",
    "sentinels <extra_id_0> and <extra_id_1><extra_id_2> and a fake <extra_id_99>", "", " ", "\n",
    "numbers 12345 3.14159 1e-9", "combining e\u0301 vs \u00e9, NBSP\u00a0here, RTL \u05e9\u05dc\u05d5\u05dd",
    "punctuation!!! ??? ... --- ((()))", "a" * 300,
]
CORPUS = [t * 2 for t in TEXTS] * 20 + ["the quick brown fox jumps over the lazy dog"] * 50


@pytest.fixture(scope="module")
def tokenizers():
    toks = {"byte": ByteTokenizer(num_sentinels=3), "byte_plain": ByteTokenizer()}
    for kind in ("bpe", "wordpiece", "unigram"):
        toks[kind] = TrainedTokenizer(train_hf_tokenizer(kind, CORPUS, 400, 2), kind, num_sentinels=3)
    return toks


def _write(tok, family, path):
    path.mkdir()
    for name, content in tokenizer_files(tok, family, 128).items():
        (path / name).write_text(content)
    return path


@pytest.mark.parametrize("name", ["byte", "byte_plain", "bpe", "wordpiece", "unigram"])
def test_autotokenizer_equals_lmkit_encode(name, tokenizers, tmp_path):
    tok = tokenizers[name]
    hf = transformers.AutoTokenizer.from_pretrained(str(_write(tok, "gpt", tmp_path / "hf")))
    for text in TEXTS:
        assert hf(text, add_special_tokens=False).input_ids == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text), text  # a gpt export adds nothing
    assert hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.eos_id and hf.mask_token_id == tok.mask_id
    if tok.num_sentinels:
        assert hf.convert_tokens_to_ids("<extra_id_0>") == tok.sentinel_id(0) == tok.vocab_size - 1
        assert hf.convert_tokens_to_ids("<extra_id_2>") == tok.sentinel_id(2)
    assert len(hf) == tok.vocab_size
    if name.startswith("byte"):  # every byte sequence decodes back
        ids = tok.encode(TEXTS[3])
        assert hf.decode(ids) == TEXTS[3]


@pytest.mark.parametrize("name", ["byte", "wordpiece"])
def test_bert_export_frames_like_lmkit_mlm_inputs(name, tokenizers, tmp_path):
    tok = tokenizers[name]
    hf = transformers.AutoTokenizer.from_pretrained(str(_write(tok, "bert", tmp_path / "hf")))
    text = "frame me"
    assert hf(text).input_ids == [tok.cls_id, *tok.encode(text), tok.sep_id]
    assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
    pair = hf("a b", "c")
    assert pair.input_ids == [tok.cls_id, *tok.encode("a b"), tok.sep_id, *tok.encode("c"), tok.sep_id]
    assert pair.token_type_ids == [0] * (len(tok.encode("a b")) + 2) + [1] * (len(tok.encode("c")) + 1)


@pytest.mark.parametrize("name", ["byte", "byte_plain", "bpe", "wordpiece", "unigram"])
@pytest.mark.parametrize("family", ["gpt", "bert", "bart"])
def test_tokenizer_directory_imports_back(name, family, tokenizers, tmp_path):
    tok = tokenizers[name]
    back = load_tokenizer_dir(_write(tok, family, tmp_path / "hf"))
    assert type(back) is type(tok)
    assert back.fingerprint() == tok.fingerprint() and back.vocab_size == tok.vocab_size
    assert back.num_sentinels == tok.num_sentinels
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
