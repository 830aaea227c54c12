"""lmkit tokenizers <-> Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

``AutoTokenizer.from_pretrained(DIR)`` then gives lmkit's ids on any text:
``tok(text, add_special_tokens=False).input_ids == lmkit_tokenizer.encode(text)``; with
``add_special_tokens=True`` (transformers' default) BERT/ALBERT exports frame the text as
lmkit's MLM inputs are framed (``[CLS] text [SEP]``), BART exports as ``<bos> text <eos>``.

* Trained BPE/WordPiece/Unigram: lmkit's own HF ``tokenizers`` file, unchanged.
* The byte tokenizer: an equivalent HF tokenizer, built here: a byte-level BPE without
  merges (one token per UTF-8 byte, id = byte value), the named specials at 256.. and the
  sentinels on top, counting down. lmkit's byte tokenizer never matches special names in
  text (``"[MASK]"`` is six bytes), so the export sets ``split_special_tokens`` (transformers
  then does the same).
"""
from __future__ import annotations

import json

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from lmkit.tokenizers.base import SPECIAL_TOKENS
from lmkit.tokenizers.byte import ByteTokenizer

HF_ROLES = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
BYTE_MARK = "lmkit_byte_tokenizer"  # tokenizer_config.json key: the byte tokenizer (for import)


def _sentinels(n: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in reversed(range(n))]  # ascending ids: <extra_id_0> is the top id


def byte_tokenizer_hf(num_sentinels: int) -> HFTokenizer:
    """An HF tokenizer with exactly :class:`ByteTokenizer`'s ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _sentinels(num_sentinels)])
    return hf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _post_processor(hf: HFTokenizer, family: str):
    def tid(name):
        return hf.token_to_id(name)

    if family in ("bert", "albert") and tid("[CLS]") is not None and tid("[SEP]") is not None:
        return processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tid("[CLS]")), ("[SEP]", tid("[SEP]"))])
    if family == "bart" and tid("<bos>") is not None and tid("<eos>") is not None:
        return processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
            special_tokens=[("<bos>", tid("<bos>")), ("<eos>", tid("<eos>"))])
    return None


def tokenizer_files(tokenizer, family: str, max_len: int | None) -> dict[str, str]:
    """The three files, as text, for ``tokenizer`` (an lmkit tokenizer) exported with a ``family`` model."""
    is_byte = isinstance(tokenizer, ByteTokenizer)
    if is_byte:
        hf = byte_tokenizer_hf(tokenizer.num_sentinels)
    elif hasattr(tokenizer, "hf"):
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    else:
        from lmkit.errors import ConfigError

        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no Hugging Face form (lmkit exports the byte "
                          f"tokenizer and the trained bpe/wordpiece/unigram tokenizers)")
    post = _post_processor(hf, family)
    if post is not None:
        hf.post_processor = post
    specials = {role: name for role, name in HF_ROLES.items() if hf.token_to_id(name) is not None}
    extra = [n for n in SPECIAL_TOKENS if n not in HF_ROLES.values() and hf.token_to_id(n) is not None]
    extra += _sentinels(tokenizer.num_sentinels)
    special_map = dict(specials, additional_special_tokens=extra)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len or 1_000_000_000_000_000_019_884_624_838_656,
        "clean_up_tokenization_spaces": False,
        **special_map,
        "lmkit_tokenizer": "byte" if is_byte else tokenizer.kind,
        "lmkit_num_sentinels": tokenizer.num_sentinels,
    }
    if family in ("bert", "albert"):  # segment ids, as BERT's tokenizers give them
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    if is_byte:
        config["split_special_tokens"] = True
    return {
        "tokenizer.json": hf.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }


def load_tokenizer_dir(path):
    """The lmkit tokenizer of an HF model directory written by lmkit (tokenizer.json + tokenizer_config.json)."""
    from pathlib import Path

    from lmkit.errors import ConfigError
    from lmkit.tokenizers.trained import TrainedTokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError(f"'{path}' has no tokenizer.json (lmkit reads the tokenizer of an HF directory from it)")
    config = {}
    if (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text())
    n_sentinels = config.get("lmkit_num_sentinels")
    hf = HFTokenizer.from_file(str(tj))
    if n_sentinels is None:
        n_sentinels = sum(1 for name in hf.get_vocab(with_added_tokens=True) if name.startswith("<extra_id_"))
    if config.get("lmkit_tokenizer") == "byte":
        return ByteTokenizer(num_sentinels=int(n_sentinels))
    missing = [n for n in SPECIAL_TOKENS if hf.token_to_id(n) is None]
    if missing:
        raise ConfigError(f"the tokenizer in '{path}' lacks lmkit's special tokens {missing} (lmkit imports the "
                          f"tokenizers it exported)")
    hf.post_processor = None  # lmkit's encode adds no special tokens
    kind = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(type(hf.model).__name__)
    if kind is None:
        raise ConfigError(f"the tokenizer in '{path}' is a {type(hf.model).__name__} model; lmkit has bpe, "
                          f"wordpiece and unigram")
    return TrainedTokenizer(hf, kind, int(n_sentinels))
