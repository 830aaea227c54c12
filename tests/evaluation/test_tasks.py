"""Task files (lm-eval's YAML format over local jsonl), the shipped tasks and their builders, k-shot prompts,
and the metrics of each task type."""
from __future__ import annotations

import json
import re

import pytest

from lmkit.errors import ConfigError, LmkitError
from lmkit.evaluation import builders
from lmkit.evaluation.tasks import evaluate_task, load_task, shipped_tasks


def test_shipped_task_files_are_what_the_builders_make(tmp_path):
    builders.write_shipped(tmp_path)
    shipped = {p.name for p in builders.Path(builders.__file__).parent.joinpath("tasks").iterdir()}
    assert shipped == {p.name for p in tmp_path.iterdir()}
    for p in tmp_path.iterdir():
        assert p.read_bytes() == (builders.Path(builders.__file__).parent / "tasks" / p.name).read_bytes(), p.name


def test_arithmetic_problems_have_the_right_answers_and_operand_ranges():
    for name, (digits, op) in builders.ARITHMETIC.items():
        task = load_task(f"arithmetic_{name}")
        assert task.output_type == "generate_until" and len(task.docs) == 500
        operands = []
        for doc in task.docs:
            a, word, b = re.match(r"Question: What is (\d+) (plus|minus) (\d+)\?\nAnswer:$", doc["context"]).groups()
            assert word == op and int(doc["completion"]) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
            operands += [int(a), int(b)]
        assert max(operands) < 10 ** digits and max(operands) >= 0.9 * 10 ** digits  # the whole range is drawn
        assert min(operands) < 10 ** (digits - 1)  # small numbers too, as in GPT-3's files


def test_corpus_tasks_come_from_the_held_out_text():
    from lmkit.data.sources import BUILTIN_CORPORA

    text = BUILTIN_CORPORA["tinyshakespeare"].read_text()
    held = builders.held_out_text(text)
    assert text.endswith(held) and len(held) < 0.11 * len(text)
    task = load_task("shakespeare_next_line")
    for doc in task.docs:
        true = doc["choices"][doc["answer"]]
        assert doc["context"] + "\n" + true in held
        for i, other in enumerate(doc["choices"]):
            if i != doc["answer"]:
                assert doc["context"] + "\n" + other not in held
    for doc in load_task("shakespeare_line_end").docs:  # the rest of the line, cut mid-line
        ends = doc["choices"]
        assert doc["context"] + ends[doc["answer"]] + "\n" in held
        assert len({len(e) for e in ends}) == 1  # every ending as long as the true one
        assert all(doc["context"] + e + "\n" not in held for i, e in enumerate(ends) if i != doc["answer"])
    for doc in load_task("shakespeare_last_word").docs:
        assert doc["target"].startswith(" ") and doc["context"] + doc["target"] in held


def test_k_shot_prompts_leave_out_the_document_and_follow_the_seed():
    task = load_task("arithmetic_2da")
    zero = task.prompts(0, limit=3)
    assert [p for _, p in zero] == [d["context"] for d in task.docs[:3]]
    three = task.prompts(3, seed=5, limit=40)
    for doc, prompt in three:
        examples = prompt.split("\n\n")
        assert len(examples) == 4 and examples[-1] == doc["context"]
        shots = [e for e in examples[:-1]]
        assert all(s.rsplit(" ", 1)[0] != doc["context"] for s in shots)  # never the document itself
        for s in shots:  # each example is text + delimiter + its own answer
            q, answer = s.rsplit(" ", 1)
            assert any(d["context"] == q and d["completion"] == answer for d in task.docs)
    assert three == task.prompts(3, seed=5, limit=40)
    assert three != task.prompts(3, seed=6, limit=40)


class FakeScorer:
    """Log-likelihoods from a table, generations from a table."""

    def __init__(self, lls=None, outputs=None):
        self.lls, self.outputs, self.requests = lls or {}, outputs or {}, []

    def loglikelihood(self, requests):
        self.requests += requests
        return [self.lls[cont] for _, cont in requests]

    def generate_until(self, requests):
        return [self.outputs[context] for context, _, _ in requests]


def _write_task(tmp_path, spec: dict, docs: list[dict]):
    import yaml

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
            "test_split": "test", **spec}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "t.yaml"


def test_multiple_choice_acc_and_length_normalised_acc(tmp_path):
    path = _write_task(tmp_path, {"output_type": "multiple_choice", "doc_to_text": "Q: {{q}}", "doc_to_choice": "opts",
                                  "doc_to_target": "gold"}, [{"q": "x", "opts": ["a", "bbbbbbbb"], "gold": 1}])
    # in total the short wrong choice is likelier; per character (lm-eval's acc_norm) the long right one
    scorer = FakeScorer({" a": (-2.0, False), " bbbbbbbb": (-4.0, False)})
    result = evaluate_task(scorer, load_task(str(path)))
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0 and result["chance"] == 0.5
    assert scorer.requests == [("Q: x", " a"), ("Q: x", " bbbbbbbb")]


def test_last_word_accuracy_is_greedy_match_and_generation_is_exact_match(tmp_path):
    path = _write_task(tmp_path, {"output_type": "loglikelihood", "doc_to_text": "c", "doc_to_target": "t"},
                       [{"c": "one", "t": " two"}, {"c": "three", "t": " four"}])
    result = evaluate_task(FakeScorer({" two": (-1.0, True), " four": (-3.0, False)}), load_task(str(path)))
    assert result["acc"] == 0.5 and result["perplexity"] == pytest.approx(2.718281828 ** 2)
    (tmp_path / "g").mkdir()
    path = _write_task(tmp_path / "g", {"output_type": "generate_until", "doc_to_text": "c", "doc_to_target": "t",
                                        "generation_kwargs": {"until": ["\n"]}},
                       [{"c": "1+1=", "t": "2"}, {"c": "2+2=", "t": "4"}])
    result = evaluate_task(FakeScorer(outputs={"1+1=": " 2 ", "2+2=": "5"}), load_task(str(path)))
    assert result["exact_match"] == 0.5


@pytest.mark.parametrize("spec,docs,expected", [
    ({"output_type": "multiple_choise", "doc_to_text": "c", "doc_to_target": "t"}, [{"c": "x", "t": "y"}],
     "Did you mean 'multiple_choice'"),
    ({"output_type": "loglikelihood", "doc_to_txt": "c", "doc_to_target": "t"}, [{"c": "x", "t": "y"}],
     "unknown key 'doc_to_txt'"),
    ({"output_type": "loglikelihood", "doc_to_text": "{{ missing }}", "doc_to_target": "t"}, [{"c": "x", "t": "y"}],
     "templates do not fit"),
    ({"output_type": "multiple_choice", "doc_to_text": "c", "doc_to_target": "t"}, [{"c": "x", "t": "y"}],
     "needs doc_to_choice"),
    ({"output_type": "multiple_choice", "doc_to_text": "c", "doc_to_choice": "o", "doc_to_target": "t"},
     [{"c": "x", "o": ["a", "b"], "t": 5}], "not a choice index"),
    ({"output_type": "loglikelihood", "doc_to_text": "c", "doc_to_target": "t"}, [], "holds no document"),
])
def test_malformed_task_files_are_one_clear_error(tmp_path, spec, docs, expected):
    path = _write_task(tmp_path, spec, docs)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_task(str(path))


def test_unknown_tasks_and_broken_files_are_named():
    with pytest.raises(ConfigError, match="Did you mean 'shakespeare_next_line'"):
        load_task("shakespeare_nextline")
    with pytest.raises(ConfigError, match="does not exist"):
        load_task("/nonexistent/task.yaml")
    assert {"arithmetic_2da", "arithmetic_3ds", "shakespeare_next_line", "shakespeare_last_word"} <= set(shipped_tasks())


def test_a_bad_json_line_names_file_and_line(tmp_path):
    path = _write_task(tmp_path, {"output_type": "loglikelihood", "doc_to_text": "c", "doc_to_target": "t"},
                       [{"c": "x", "t": "y"}])
    (tmp_path / "docs.jsonl").write_text('{"c": "x", "t": "y"}\n{"c": oops}\n')
    with pytest.raises(LmkitError, match=r"docs.jsonl:2: invalid JSON"):
        load_task(str(path))
