"""Supervised fine-tuning data: prompt/response records packed into rows with segment markers.

A record is a prompt/response pair (``{"prompt": ..., "response": ...}``, field names
configurable) or a conversation (``{"messages": [{"role": ..., "content": ...}, ...]}``).
Each example is encoded turn by turn as ::

    [NLU] template(prompt) [S2S] response ... [NLU] template(prompt) [S2S] response <eos>

so the collators can tell, from the marker ids alone, which tokens are responses: the
tokens after a ``[S2S]`` up to the next marker, and that marker (the ``<eos>`` that ends the
example, or the ``[NLU]`` that ends a turn) as the end-of-response target. Examples are
packed whole and in order into rows of ``data.seq_len`` tokens (a row is padded with
``<pad>`` where the next example does not fit), so no example is ever cut across rows; the
token array holds the rows back to back and the objective reads them with stride
``seq_len``. The array's tail is padded so that lmkit's validation split (the last
``data.val_fraction`` of the tokens) starts on a row boundary: the held-out examples are the
last records of the data.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmkit.data.sources import (
    BUILTIN_CORPORA, JsonlSource, Source, _json_type, files_fingerprint, jsonl_records,
)
from lmkit.errors import ConfigError, DataError, did_you_mean

PROMPT_MARK, RESPONSE_MARK = "[NLU]", "[S2S]"
OVERLONG = ("error", "skip", "truncate")
_VERSION = "sft1"  # bump when the row layout changes (part of the cache key)


@dataclass
class SFTFormat:
    """How records are read and how prompts are written (the ``sft`` objective's options)."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    role_field: str = "role"
    content_field: str = "content"
    response_role: str = "assistant"
    template: str = "{prompt}\n"

    def check(self) -> "SFTFormat":
        if "{prompt}" not in self.template:
            raise ConfigError(f"objective.template must contain {{prompt}} (where the prompt goes), got "
                              f"{self.template!r}")
        for key in ("prompt_field", "response_field", "messages_field", "role_field", "content_field", "response_role"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"objective.{key} must be a non-empty string, got {getattr(self, key)!r}")
        return self

    def render(self, prompt: str) -> str:
        """The prompt written in the template (plain replacement: braces in the text are kept)."""
        return self.template.replace("{prompt}", prompt)


#: one example: its turns as (prompt text, response text), the prompt already in the template
Turns = list[tuple[str, str]]


def record_turns(record: dict, fmt: SFTFormat, where: str) -> Turns:
    """The turns of one record; ``where`` ("file:line") names it in errors."""
    if fmt.messages_field in record:
        return _conversation_turns(record[fmt.messages_field], fmt, where)
    for key, field in (("response_field", fmt.response_field), ("prompt_field", fmt.prompt_field)):
        if field not in record:
            keys = [str(k) for k in record]
            hint = did_you_mean(field, keys, prefix=f"objective.{key}=")
            raise DataError(f"{where}: no field '{field}'.{hint} Set objective.{key} to the field holding it, or give "
                            f"the example as '{fmt.messages_field}' (this line has: {', '.join(keys[:10]) or 'no fields'}).")
    prompt = _string(record[fmt.prompt_field], fmt.prompt_field, where)
    response = _string(record[fmt.response_field], fmt.response_field, where)
    if not response.strip():
        raise DataError(f"{where}: the response ('{fmt.response_field}') is empty; an SFT example needs a response "
                        f"to learn. Remove the line or fill the field.")
    return [(fmt.render(prompt), response)]


def _conversation_turns(messages, fmt: SFTFormat, where: str) -> Turns:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{fmt.messages_field}' must be a non-empty list of {{'{fmt.role_field}': ..., "
                        f"'{fmt.content_field}': ...}} objects.")
    turns: Turns = []
    prompt, response = "", None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or fmt.role_field not in m or fmt.content_field not in m:
            raise DataError(f"{where}: message {i} of '{fmt.messages_field}' is not an object with "
                            f"'{fmt.role_field}' and '{fmt.content_field}' fields.")
        content = _string(m[fmt.content_field], f"{fmt.messages_field}[{i}].{fmt.content_field}", where)
        if m[fmt.role_field] == fmt.response_role:
            if not content.strip():
                raise DataError(f"{where}: message {i} ({fmt.response_role}) is empty; a response needs text.")
            response = content if response is None else response + content
        else:  # user, system, ...: prompt text, each message written in the template
            if response is not None:
                turns.append((prompt, response))
                prompt, response = "", None
            prompt += fmt.render(content)
    if response is None:
        raise DataError(f"{where}: the conversation does not end with a '{fmt.response_role}' message (objective."
                        f"response_role): there is no response to learn after the last prompt.")
    turns.append((prompt, response))
    return turns


def _string(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is {_json_type(value)}, not a string.")
    return value


def jsonl_examples(files: list[Path], fmt: SFTFormat) -> Iterator[tuple[str, Turns]]:
    """``("file:line", turns)`` of every record of the JSON-lines ``files``."""
    wanted = f"'{fmt.prompt_field}' and '{fmt.response_field}' fields (or '{fmt.messages_field}')"
    for f in files:
        for lineno, record in jsonl_records(f, wanted):
            yield f"{f}:{lineno}", record_turns(record, fmt, f"{f}:{lineno}")


def shakespeare_speeches(text: str | None = None) -> list[dict]:
    """Speaker → speech pairs of the built-in corpus, in corpus order: ``{"prompt": "ROMEO", "response": ...,
    "line": N}``. A speech is a block ``NAME:\\nline...`` between blank lines."""
    if text is None:
        text = BUILTIN_CORPORA["tinyshakespeare"].read_text(encoding="utf-8")
    records, lineno = [], 1
    for block in text.split("\n\n"):
        head, _, body = block.strip("\n").partition("\n")
        if head.endswith(":") and body.strip():
            records.append({"prompt": head[:-1], "response": body.strip("\n"), "line": lineno})
        lineno += block.count("\n") + 2
    return records


def write_speeches_jsonl(path, records: list[dict] | None = None) -> Path:
    """Write speaker → speech pairs (default: all of the built-in corpus) as JSON lines; returns ``path``."""
    path = Path(path)
    records = shakespeare_speeches() if records is None else records
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in records),
                    encoding="utf-8")
    return path


def check_overlong(value) -> None:
    """``objective.overlong``: error | skip | truncate."""
    if value not in OVERLONG:
        raise ConfigError(f"objective.overlong must be one of {', '.join(OVERLONG)}, got {value!r}."
                          f"{did_you_mean(str(value), OVERLONG)}".rstrip("."))


class SFTSource(Source):
    """SFT examples as a :class:`Source`: text documents (for tokenizer training) and packed rows.

    ``token_array`` (used by :func:`lmkit.data.cache.build_token_array` instead of plain
    document packing) returns the rows described in the module docstring. The fingerprint
    covers the records' files, the format (fields, template), the row length, the
    validation fraction and the overlong policy, so the token cache is exact.
    """

    def __init__(self, fmt: SFTFormat, seq_len: int, val_fraction: float, overlong: str = "error",
                 files: list[Path] | None = None):
        self.fmt, self.seq_len, self.val_fraction, self.overlong = fmt.check(), seq_len, val_fraction, overlong
        self.files = files  # None: the built-in corpus's speaker → speech pairs
        check_overlong(overlong)

    def fingerprint(self) -> str:
        files = self.files if self.files is not None else [BUILTIN_CORPORA["tinyshakespeare"]]
        what = f"{_VERSION}|{'jsonl' if self.files is not None else 'speeches'}|{self.fmt!r}|{self.seq_len}|" \
               f"{self.val_fraction}|{self.overlong}"
        return files_fingerprint(files) + ":" + hashlib.sha256(what.encode()).hexdigest()[:16]

    def examples(self) -> Iterator[tuple[str, Turns]]:
        if self.files is not None:
            yield from jsonl_examples(self.files, self.fmt)
            return
        corpus = BUILTIN_CORPORA["tinyshakespeare"]
        for r in shakespeare_speeches():
            yield f"{corpus}:{r['line']}", [(self.fmt.render(r["prompt"]), r["response"])]

    def documents(self) -> Iterator[str]:
        for _, turns in self.examples():
            yield "".join(p + r for p, r in turns)

    def token_array(self, tokenizer) -> np.ndarray:
        from lmkit.data.cache import token_dtype

        rows, skipped = pack_rows((encode_example(tokenizer, turns, where) for where, turns in self.examples()),
                                  self.seq_len, tokenizer.pad_id, self.overlong, tokenizer.special_id(RESPONSE_MARK))
        if skipped:
            print(f"lmkit: sft: skipped {skipped} example(s) longer than data.seq_len={self.seq_len} tokens "
                  f"(objective.overlong=skip)", flush=True)
        if not rows:
            raise DataError("no SFT example fits: the data holds no record with a response. Check data.path.")
        tokens = np.concatenate(rows)
        return align_validation(tokens, self.seq_len, self.val_fraction, tokenizer.pad_id).astype(
            token_dtype(tokenizer.vocab_size))


def encode_example(tokenizer, turns: Turns, where: str) -> tuple[str, np.ndarray]:
    """``(where, ids)``: ``[NLU] prompt [S2S] response`` per turn, then ``<eos>``."""
    nlu, s2s, eos = tokenizer.special_id(PROMPT_MARK), tokenizer.special_id(RESPONSE_MARK), tokenizer.eos_id
    marks = np.array([nlu, s2s, eos, tokenizer.pad_id])
    parts: list[np.ndarray] = []
    for prompt, response in turns:
        p = np.asarray(tokenizer.encode(prompt), dtype=np.int64)
        r = np.asarray(tokenizer.encode(response), dtype=np.int64)
        if np.isin(p, marks).any() or np.isin(r, marks).any():
            raise DataError(f"{where}: the text contains one of the marker tokens {PROMPT_MARK}, {RESPONSE_MARK}, "
                            f"<eos>, <pad> (the tokenizer reads it as that special token); remove it from the text.")
        if not r.size:
            raise DataError(f"{where}: the response encodes to no token; an SFT example needs a response.")
        parts += [np.array([nlu]), p, np.array([s2s]), r]
    parts.append(np.array([eos]))
    return where, np.concatenate(parts)


def pack_rows(examples, row_len: int, pad_id: int, overlong: str, s2s_id: int) -> tuple[list[np.ndarray], int]:
    """Whole ``(where, ids)`` examples, in order, into rows of ``row_len`` tokens (the tail of a row padded);
    returns ``(rows, skipped)``. ``s2s_id``: the response marker (truncation keeps at least one response token)."""
    rows: list[np.ndarray] = []
    current: list[np.ndarray] = []
    used = skipped = 0
    for where, ids in examples:
        if len(ids) > row_len:
            if overlong == "skip":
                skipped += 1
                continue
            if overlong == "truncate":
                last_s2s = np.flatnonzero(ids[:row_len] == s2s_id)
                if not last_s2s.size or last_s2s[-1] >= row_len - 1:
                    raise DataError(f"{where}: the prompt alone takes {row_len} tokens or more (data.seq_len="
                                    f"{row_len}), so no response token is left after truncation. Raise data.seq_len "
                                    f"or shorten the prompt.")
                ids = ids[:row_len]
            else:
                raise DataError(f"{where}: the example is {len(ids)} tokens long (prompt, response and markers), "
                                f"more than data.seq_len={row_len}. Raise data.seq_len, or set objective.overlong=skip "
                                f"(leave it out) or objective.overlong=truncate (cut its end).")
        if used + len(ids) > row_len:
            rows.append(_pad_row(current, row_len, pad_id))
            current, used = [], 0
        current.append(ids)
        used += len(ids)
    if current:
        rows.append(_pad_row(current, row_len, pad_id))
    return rows, skipped


def _pad_row(parts: list[np.ndarray], row_len: int, pad_id: int) -> np.ndarray:
    row = np.full(row_len, pad_id, dtype=np.int64)
    ids = np.concatenate(parts)
    row[:len(ids)] = ids
    return row


def align_validation(tokens: np.ndarray, row_len: int, val_fraction: float, pad_id: int) -> np.ndarray:
    """``tokens`` (whole rows) with the fewest ``<pad>`` appended so that the training split of
    :func:`lmkit.data.datamodule.split_tokens` ends on a row boundary (validation rows stay whole)."""
    from lmkit.data.datamodule import split_tokens

    def train_len(n: int) -> int:
        return len(split_tokens(np.broadcast_to(np.int8(0), (n,)), val_fraction).train)

    n = len(tokens)
    target = -(-train_len(n) // row_len) * row_len  # the row boundary at or after the split
    extra = 0
    while train_len(n + extra) < target:  # grows by 0 or 1 per token: stops on target exactly
        extra += 1
    return np.concatenate([tokens, np.full(extra, pad_id, dtype=tokens.dtype)]) if extra else tokens


def sft_source(fmt: SFTFormat, data_cfg, source, overlong: str) -> SFTSource:
    """The SFT records behind a data source: jsonl files, or the built-in corpus's speaker → speech pairs."""
    if isinstance(source, JsonlSource):
        return SFTSource(fmt, data_cfg.seq_len, data_cfg.val_fraction, overlong, files=source.files)
    if data_cfg.source == "tinyshakespeare":
        return SFTSource(fmt, data_cfg.seq_len, data_cfg.val_fraction, overlong)
    raise ConfigError(f"objective sft reads prompt/response records from JSON lines: set data=jsonl "
                      f"data.path=FILE.jsonl (data.source={data_cfg.source} is not supported), or keep the built-in "
                      f"corpus (data=tinyshakespeare) for its speaker → speech pairs.")
