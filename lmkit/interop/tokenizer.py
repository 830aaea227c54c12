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
  4.42 and later then do the same; older versions ignore it for fast tokenizers and read such
  names in text as the special tokens).

Checked with transformers 4.42, 4.43, 4.46, 4.57 and 5.25 (tests/interop).
"""
from __future__ import annotations

import json

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from lmkit.tokenizers.base import SPECIAL_TOKENS
from lmkit.tokenizers.byte import ByteTokenizer
from lmkit.tokenizers.trained import TrainedTokenizer

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


#: lmkit special token -> the HF roles that may stand for it, in order (GPT-2 has only <|endoftext|>: it is
#: eos, bos and pad; BERT has no eos/bos: [SEP] ends and [CLS] starts)
ROLE_CANDIDATES = {
    "<pad>": ("pad_token", "eos_token", "unk_token"), "<eos>": ("eos_token", "sep_token"),
    "<bos>": ("bos_token", "cls_token", "eos_token"), "<unk>": ("unk_token", "eos_token"),
    "[CLS]": ("cls_token", "bos_token", "eos_token"), "[SEP]": ("sep_token", "eos_token"),
    "[MASK]": ("mask_token", "unk_token", "eos_token"), "[NLU]": ("unk_token", "eos_token"),
    "[NLG]": ("unk_token", "eos_token"), "[S2S]": ("unk_token", "eos_token"),
}


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def foreign_roles(hf: HFTokenizer, config: dict, path) -> dict[str, str]:
    """lmkit special name -> the token of a foreign HF tokenizer that plays its part (see :data:`ROLE_CANDIDATES`)."""
    from lmkit.errors import ConfigError

    given = {role: _token_text(config.get(role)) for role in HF_ROLES if config.get(role) is not None}
    roles = {}
    for name, candidates in ROLE_CANDIDATES.items():
        if hf.token_to_id(name) is not None:
            roles[name] = name
            continue
        found = next((given[r] for r in candidates if r in given and hf.token_to_id(given[r]) is not None), None)
        if found is None:
            raise ConfigError(f"the tokenizer in '{path}' has no token lmkit can use as {name} (tokenizer_config.json "
                              f"names none of {', '.join(candidates)})")
        roles[name] = found
    return roles


class HFDirTokenizer(TrainedTokenizer):
    """A foreign HF tokenizer (bert-base's, gpt2's, t5's) with its special tokens standing in for lmkit's names.

    ``roles`` maps each lmkit special name to the tokenizer's own token (``"[MASK]" -> "[MASK]"``,
    ``"<eos>" -> "[SEP]"``, ...). Saved as a JSON holding the HF tokenizer and the roles, which
    :func:`lmkit.tokenizers.trained.load_tokenizer_file` reads back.
    """

    def __init__(self, hf: HFTokenizer, kind: str, num_sentinels: int, roles: dict[str, str]):
        self.roles = dict(roles)
        super().__init__(hf, kind, num_sentinels)
        self._special = {name: hf.token_to_id(token) for name, token in self.roles.items()}

    def special_table(self):
        table = super().special_table()
        for token in list(self.roles.values()) + [t.content for t in self.hf.get_added_tokens_decoder().values()
                                                   if t.special]:
            i = self.hf.token_to_id(token)
            if i is not None and i < len(table):
                table[i] = True
        return table

    def save(self, path) -> None:
        data = {"lmkit_tokenizer": "hf_dir", "kind": self.kind, "num_sentinels": self.num_sentinels,
                "roles": self.roles, "tokenizer": json.loads(self.hf.to_str())}
        with open(path, "w") as f:
            json.dump(data, f, ensure_ascii=False)

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(f"{super().fingerprint()}:{sorted(self.roles.items())}".encode()).hexdigest()[:16]

    @classmethod
    def from_saved(cls, data: dict) -> "HFDirTokenizer":
        hf = HFTokenizer.from_str(json.dumps(data["tokenizer"]))
        return cls(hf, data["kind"], int(data["num_sentinels"]), data["roles"])


def _without_post_processor(hf: HFTokenizer) -> HFTokenizer:
    """``hf`` without its post-processor (lmkit's encode adds no special tokens; older ``tokenizers`` refuse
    assigning None, so through the JSON)."""
    data = json.loads(hf.to_str())
    data["post_processor"] = None
    return HFTokenizer.from_str(json.dumps(data))


def load_tokenizer_dir(path):
    """The lmkit tokenizer of an HF model directory (tokenizer.json + tokenizer_config.json).

    A directory lmkit exported gives back its own tokenizer; a foreign one (bert-base's, gpt2's)
    an :class:`HFDirTokenizer` whose special tokens stand in for lmkit's names.
    """
    from pathlib import Path

    from lmkit.errors import ConfigError

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
    kind = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(type(hf.model).__name__)
    if kind is None:
        raise ConfigError(f"the tokenizer in '{path}' is a {type(hf.model).__name__} model; lmkit has bpe, "
                          f"wordpiece and unigram")
    if all(hf.token_to_id(n) is not None for n in SPECIAL_TOKENS):
        return TrainedTokenizer(_without_post_processor(hf), kind, int(n_sentinels))
    special_map = path / "special_tokens_map.json"
    if special_map.is_file():
        config = {**json.loads(special_map.read_text()), **{k: v for k, v in config.items() if k in HF_ROLES}}
    return HFDirTokenizer(hf, kind, int(n_sentinels), foreign_roles(hf, config, path))
