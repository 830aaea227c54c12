"""Builders of the tasks lmkit ships (``lmkit/evaluation/tasks/``), deterministic from a seed.

* GPT-3's arithmetic (Brown et al. 2020, §3.9.1): ``Question: What is 48 plus 76?\\nAnswer:``
  with the answer generated; two- and three-digit addition and subtraction (2da, 2ds, 3da,
  3ds), operands drawn uniformly from [0, 10^d), as in the paper's task files.
* From the built-in corpus's validation part (its last 10%, held out by the default run):
  ``shakespeare_next_line``, a 4-way multiple choice between the true next line of a speech
  and three lines drawn from elsewhere; ``shakespeare_line_end``, the same question about the
  rest of a line cut at a random character (so local spelling and grammar decide it, a
  question small models answer); ``shakespeare_last_word``, LAMBADA-style prediction of the
  last word of a passage.

``python -m lmkit.evaluation.builders [OUT_DIR]`` rewrites the shipped files (a test checks
they equal what the builders make).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import yaml

ARITHMETIC = {"2da": (2, "plus"), "2ds": (2, "minus"), "3da": (3, "plus"), "3ds": (3, "minus")}
HELD_OUT = 0.1  # the share of the corpus at its end that the default run validates on


def arithmetic_docs(digits: int, op: str, n: int, seed: int) -> list[dict]:
    """``n`` problems ``{"context": "Question: What is a plus b?\\nAnswer:", "completion": "c"}``."""
    rnd = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rnd.randrange(10 ** digits), rnd.randrange(10 ** digits)
        value = a + b if op == "plus" else a - b
        docs.append({"context": f"Question: What is {a} {op} {b}?\nAnswer:", "completion": str(value)})
    return docs


def held_out_text(text: str) -> str:
    """The corpus's last :data:`HELD_OUT` share, from the first speech that starts inside it."""
    tail = text[int(len(text) * (1 - HELD_OUT)):]
    return tail[tail.find("\n\n") + 2:]


def _speeches(text: str) -> list[list[str]]:
    """Speeches (blocks separated by blank lines) as lists of lines, the speaker's name line dropped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append(lines[1:])
    return out


def _four_way(rnd: random.Random, true: str, draw) -> tuple[list[str], int]:
    """``true`` and three distinct distractors from ``draw()`` (None: a rejected draw), shuffled; and the index
    of ``true``."""
    others: list[str] = []
    while len(others) < 3:
        candidate = draw()
        if candidate is not None and candidate not in others:
            others.append(candidate)
    choices = others + [true]
    rnd.shuffle(choices)
    return choices, choices.index(true)


def next_line_docs(text: str, n: int, seed: int, context_lines: int = 3) -> list[dict]:
    """Which of four lines continues the passage: the true next line and three from other speeches."""
    rnd = random.Random(seed)
    speeches = [s for s in _speeches(text) if len(s) > context_lines]
    all_lines = [line for s in speeches for line in s]
    docs = []
    for s in rnd.sample(speeches, min(n, len(speeches))):
        at = rnd.randrange(context_lines, len(s))
        true = s[at]

        def other_line():
            line = rnd.choice(all_lines)
            return line if line not in s else None

        choices, answer = _four_way(rnd, true, other_line)
        docs.append({"context": "\n".join(s[at - context_lines:at]), "choices": choices, "answer": answer})
    return docs


def line_end_docs(text: str, n: int, seed: int, context_lines: int = 2, min_cut: int = 8) -> list[dict]:
    """Which of four line endings completes the passage: the true rest of its last line, cut at a random
    character, and the rests of three other lines cut at the same length from their end."""
    rnd = random.Random(seed)
    speeches = [s for s in _speeches(text) if len(s) > context_lines]
    all_lines = [line for s in speeches for line in s]
    docs = []
    for s in rnd.sample(speeches, min(n, len(speeches))):
        at = rnd.randrange(context_lines, len(s))
        line = s[at]
        if len(line) < 2 * min_cut:
            continue
        cut = rnd.randrange(min_cut, len(line) - min_cut // 2)
        true = line[cut:]

        def other_end():
            other = rnd.choice(all_lines)
            end = other[-len(true):]
            return end if len(other) > len(true) and end != true and other not in s else None

        choices, answer = _four_way(rnd, true, other_end)
        context = "\n".join(s[at - context_lines:at] + [line[:cut]])
        docs.append({"context": context, "choices": choices, "answer": answer})
    return docs


_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.,;:!?]*$", re.S)


def last_word_docs(text: str, n: int, seed: int, context_lines: int = 4) -> list[dict]:
    """A passage of up to ``context_lines`` lines of one speech without its last word, and that word."""
    rnd = random.Random(seed)
    docs, seen = [], set()
    for s in rnd.sample(_speeches(text), len(_speeches(text))):
        passage = "\n".join(s[:context_lines])
        m = _LAST_WORD.match(passage)
        if m is None or passage in seen:
            continue
        seen.add(passage)
        docs.append({"context": m.group(1), "target": " " + m.group(2)})
        if len(docs) == n:
            break
    return docs


def _task_yaml(name: str, output_type: str, extra: dict) -> dict:
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
            "test_split": "test", "output_type": output_type}
    spec.update(extra)
    return spec


def shipped_specs(corpus_text: str) -> dict[str, tuple[dict, list[dict]]]:
    """name -> (task YAML, documents) of every shipped task."""
    out = {}
    for name, (digits, op) in ARITHMETIC.items():
        docs = arithmetic_docs(digits, op, 500, seed=1000 + digits * 10 + (op == "minus"))
        out[f"arithmetic_{name}"] = (_task_yaml(f"arithmetic_{name}", "generate_until", {
            "doc_to_text": "{{context}}", "doc_to_target": "{{completion}}", "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        }), docs)
    held = held_out_text(corpus_text)
    out["shakespeare_next_line"] = (_task_yaml("shakespeare_next_line", "multiple_choice", {
        "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "target_delimiter": "\n", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }), next_line_docs(held, 200, seed=7))
    out["shakespeare_line_end"] = (_task_yaml("shakespeare_line_end", "multiple_choice", {
        "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "target_delimiter": "", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }), line_end_docs(held, 200, seed=13))
    out["shakespeare_last_word"] = (_task_yaml("shakespeare_last_word", "loglikelihood", {
        "doc_to_text": "{{context}}", "doc_to_target": "{{target}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}],
    }), last_word_docs(held, 200, seed=11))
    return out


def write_shipped(out_dir, corpus_text: str | None = None) -> list[Path]:
    """Write every shipped task's YAML and jsonl into ``out_dir``."""
    if corpus_text is None:
        from lmkit.data.sources import BUILTIN_CORPORA

        corpus_text = BUILTIN_CORPORA["tinyshakespeare"].read_text(encoding="utf-8")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (spec, docs) in shipped_specs(corpus_text).items():
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                                encoding="utf-8")
        written += [out_dir / f"{name}.yaml", out_dir / f"{name}.jsonl"]
    return written


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "tasks"
    for p in write_shipped(target):
        print(p)
