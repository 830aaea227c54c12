"""Few-shot tasks: local jsonl files described by a small YAML file in lm-evaluation-harness's own format.

A task YAML is a subset of lm-eval's task format, so the same file runs under ``lmkit
evaluate`` and ``lm_eval --include_path``::

    task: shakespeare_next_line
    dataset_path: json
    dataset_kwargs: {data_files: {test: shakespeare_next_line.jsonl}}   # relative: to the YAML
    test_split: test
    fewshot_split: train          # optional; default: the test docs, the current one left out
    output_type: multiple_choice  # or loglikelihood (last word) or generate_until
    doc_to_text: "{{context}}"    # a field name or a Jinja2 template over the document's fields
    doc_to_choice: "{{choices}}"  # multiple_choice: a list (field, template or YAML list)
    doc_to_target: "{{answer}}"   # multiple_choice: the index of the right choice
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    description: ""
    generation_kwargs: {until: ["\\n"], max_gen_toks: 8}

Scoring, as GPT-3 and lm-eval score: ``multiple_choice`` compares the log-likelihood of
``target_delimiter + choice`` after the prompt (``acc``) and the same divided by the choice's
length in characters (``acc_norm``); ``loglikelihood`` (LAMBADA-style last word) counts a hit
when the whole target is the greedy continuation (``acc``) and reports its perplexity;
``generate_until`` decodes greedily until a stop string and compares the stripped text with
the stripped target (``exact_match``). k-shot prompts draw k other documents of the few-shot
split with a ``random.Random(seed)`` shared by the task's documents in order, as lm-eval's
default sampler does.
"""
from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmkit.errors import ConfigError, did_you_mean

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "generate_until")
SHIPPED_DIR = Path(__file__).parent / "tasks"
KNOWN_KEYS = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "fewshot_split",
              "training_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
              "target_delimiter", "fewshot_delimiter", "description", "generation_kwargs", "metric_list",
              "num_fewshot", "metadata", "tag", "group", "should_decontaminate", "doc_to_decontamination_query",
              "repeats", "fewshot_config"}


@dataclass
class Task:
    """One task: its documents, templates and scoring (see the module docstring)."""

    name: str
    output_type: str
    docs: list[dict]
    fewshot_docs: list[dict] | None
    doc_to_text: object
    doc_to_target: object
    doc_to_choice: object = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: dict = field(default_factory=dict)
    path: Path | None = None

    # --- document -> text --------------------------------------------------------------------

    def _render(self, spec, doc: dict):
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        if isinstance(spec, str):
            return _template(spec, self.name).render(**doc)
        return spec

    def text(self, doc: dict) -> str:
        return str(self._render(self.doc_to_text, doc))

    def choices(self, doc: dict) -> list[str]:
        spec = self.doc_to_choice
        if isinstance(spec, list):
            return [str(self._render(s, doc)) for s in spec]
        value = self._render(spec, doc)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"task {self.name}: doc_to_choice gave {value[:80]!r}, not a list") from None
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"task {self.name}: doc_to_choice must give a non-empty list of choices")
        return [str(v) for v in value]

    def target(self, doc: dict):
        value = self._render(self.doc_to_target, doc)
        if self.output_type == "multiple_choice":
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value.strip())
            if isinstance(value, str):  # the choice itself
                choices = self.choices(doc)
                if value not in choices:
                    raise ConfigError(f"task {self.name}: target {value!r} is not among the choices {choices}")
                value = choices.index(value)
            if not isinstance(value, int) or not 0 <= value < len(self.choices(doc)):
                raise ConfigError(f"task {self.name}: target {value!r} is not a choice index")
        return value

    def target_text(self, doc: dict) -> str:
        """What follows the prompt in a few-shot example: the right choice, or the target."""
        target = self.target(doc)
        return self.choices(doc)[target] if self.output_type == "multiple_choice" else str(target)

    def prompts(self, num_fewshot: int, seed: int = 1234, limit: int | None = None) -> list[tuple[dict, str]]:
        """``(doc, prompt)`` for the first ``limit`` documents, each prompt with ``num_fewshot`` examples."""
        docs = self.docs[:limit] if limit else self.docs
        pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
        if num_fewshot and len(pool) - (self.fewshot_docs is None) < num_fewshot:
            raise ConfigError(f"task {self.name}: eval.num_fewshot={num_fewshot} but only {len(pool)} documents can "
                              f"serve as examples")
        rnd = random.Random(seed)
        out = []
        for doc in docs:
            parts = [self.description] if self.description else []
            if num_fewshot:
                drawn = rnd.sample(pool, num_fewshot + 1) if self.fewshot_docs is None else rnd.sample(pool, num_fewshot)
                shots = [d for d in drawn if d != doc][:num_fewshot]
                if len(shots) < num_fewshot:
                    shots = rnd.sample([d for d in pool if d != doc], num_fewshot)
                examples = self.fewshot_delimiter.join(self.text(d) + self.target_delimiter + self.target_text(d)
                                                       for d in shots)
                parts.append(examples + self.fewshot_delimiter)
            out.append((doc, "".join(parts) + self.text(doc)))
        return out


def _template(source: str, task: str):
    import jinja2

    try:
        return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"task {task}: template {source[:60]!r} is not valid Jinja2 ({e.message})") from None


# --- loading ------------------------------------------------------------------------------------


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML of the tasks lmkit ships (built from the built-in corpus, and GPT-3's arithmetic)."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def resolve_task(name_or_path: str) -> Path:
    """A shipped task's name, or the path of a task YAML."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"task file '{p}' does not exist")
        return p
    shipped = shipped_tasks()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(f"unknown task '{name_or_path}'.{did_you_mean(name_or_path, shipped)} Shipped tasks: "
                      f"{', '.join(shipped)}; or give the path of a task YAML (lm-eval's format)")


def _read_jsonl(path: Path, task: str) -> list[dict]:
    from lmkit.data.sources import jsonl_records

    if not path.is_file():
        raise ConfigError(f"task {task}: data file '{path}' does not exist")
    docs = [record for _, record in jsonl_records(path, "the task's fields")]
    if not docs:
        raise ConfigError(f"task {task}: '{path}' holds no document")
    return docs


def load_task(name_or_path: str) -> Task:
    """Read a task YAML (see the module docstring); every mistake is one ConfigError naming the file."""
    path = resolve_task(name_or_path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"task file '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"task file '{path}' must be a YAML mapping (task:, dataset_path:, output_type: ...)")
    name = str(spec.get("task") or path.stem)
    unknown = [k for k in spec if k not in KNOWN_KEYS]
    if unknown:
        raise ConfigError(f"task file '{path}': unknown key '{unknown[0]}'.{did_you_mean(unknown[0], KNOWN_KEYS)}")
    output_type = spec.get("output_type")
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"task file '{path}': output_type must be one of {', '.join(OUTPUT_TYPES)} (got "
                          f"{output_type!r}).{did_you_mean(str(output_type), OUTPUT_TYPES)}")
    if spec.get("dataset_path") != "json":
        raise ConfigError(f"task file '{path}': lmkit reads local jsonl tasks only (dataset_path: json with "
                          f"dataset_kwargs.data_files)")
    files = ((spec.get("dataset_kwargs") or {}).get("data_files")) or {}
    if not isinstance(files, dict) or not files:
        raise ConfigError(f"task file '{path}': dataset_kwargs.data_files must map split names to jsonl files")
    split = spec.get("test_split") or spec.get("validation_split") or next(iter(files))

    def split_docs(split_name):
        if split_name not in files:
            raise ConfigError(f"task file '{path}': split '{split_name}' is not in data_files ({', '.join(files)})")
        f = Path(str(files[split_name]))
        return _read_jsonl(f if f.is_absolute() else path.parent / f, name)

    for key in ("doc_to_text", "doc_to_target"):
        if spec.get(key) is None:
            raise ConfigError(f"task file '{path}' has no {key}")
    if output_type == "multiple_choice" and spec.get("doc_to_choice") is None:
        raise ConfigError(f"task file '{path}': a multiple_choice task needs doc_to_choice")
    gen = dict(spec.get("generation_kwargs") or {})
    until = gen.get("until", ["\n\n"])
    gen["until"] = [until] if isinstance(until, str) else list(until)
    task = Task(
        name=name, output_type=output_type, docs=split_docs(split),
        fewshot_docs=split_docs(spec["fewshot_split"]) if spec.get("fewshot_split") else None,
        doc_to_text=spec["doc_to_text"], doc_to_target=spec["doc_to_target"], doc_to_choice=spec.get("doc_to_choice"),
        target_delimiter=str(spec.get("target_delimiter", " ")),
        fewshot_delimiter=str(spec.get("fewshot_delimiter", "\n\n")), description=str(spec.get("description") or ""),
        generation_kwargs=gen, path=path,
    )
    for doc in task.docs[:1]:  # templates that do not fit the documents fail here, naming the task
        try:
            task.text(doc)
            task.target(doc)
            if output_type == "multiple_choice":
                task.choices(doc)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"task {name}: the templates do not fit its documents ({type(e).__name__}: {e})") from None
    return task


def lm_eval_yaml(task_name_or_path: str, out_dir) -> Path:
    """A copy of a task YAML for lm-eval (``--include_path out_dir``): data file paths made absolute, since lm-eval
    reads relative ones from the working directory."""
    path = resolve_task(task_name_or_path)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = spec["dataset_kwargs"]["data_files"]
    for split, f in files.items():
        files[split] = str((path.parent / f).resolve()) if not Path(str(f)).is_absolute() else str(f)
    out = Path(out_dir) / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


# --- scoring ------------------------------------------------------------------------------------


def evaluate_task(scorer, task: Task, num_fewshot: int = 0, seed: int = 1234, limit: int | None = None) -> dict:
    """The task's metrics under ``scorer`` (:class:`lmkit.evaluation.scorer.Scorer`), with its request count."""
    prompts = task.prompts(num_fewshot, seed, limit)
    if task.output_type == "multiple_choice":
        requests, owners = [], []
        for n, (doc, prompt) in enumerate(prompts):
            for choice in task.choices(doc):
                requests.append((prompt, task.target_delimiter + choice))
                owners.append(n)
        lls = scorer.loglikelihood(requests)
        per_doc: list[list[tuple[float, int]]] = [[] for _ in prompts]
        for (ll, _), n, (_, cont) in zip(lls, owners, requests):  # acc_norm: per character of the choice
            per_doc[n].append((ll, len(cont) - len(task.target_delimiter)))
        acc = acc_norm = 0
        for (doc, _), scores in zip(prompts, per_doc):
            gold = task.target(doc)
            acc += max(range(len(scores)), key=lambda i: scores[i][0]) == gold
            acc_norm += max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1)) == gold
        n = len(prompts)
        return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "chance": _chance(task, prompts),
                "loglikelihoods": [ll for ll, _ in lls]}
    if task.output_type == "loglikelihood":
        requests = [(prompt, str(task.target(doc))) for doc, prompt in prompts]
        lls = scorer.loglikelihood(requests)
        n = len(prompts)
        return {"acc": sum(g for _, g in lls) / n, "perplexity": math.exp(-sum(ll for ll, _ in lls) / n), "n": n,
                "loglikelihoods": [ll for ll, _ in lls]}
    until = task.generation_kwargs.get("until") or []
    max_new = int(task.generation_kwargs.get("max_gen_toks", 32))
    outputs = scorer.generate_until([(prompt, until, max_new) for _, prompt in prompts])
    hits = sum(out.strip() == str(task.target(doc)).strip() for (doc, _), out in zip(prompts, outputs))
    return {"exact_match": hits / len(prompts), "n": len(prompts), "outputs": outputs}


def _chance(task: Task, prompts) -> float:
    return sum(1 / len(task.choices(doc)) for doc, _ in prompts) / max(len(prompts), 1)


def check_task_fits(task: Task, kind: str) -> None:
    """A model of ``kind`` can do ``task`` (encoders cannot score or write continuations)."""
    if kind == "encoder":
        raise ConfigError(f"task {task.name} ({task.output_type}) needs a model that scores or writes continuations "
                          f"(a decoder or an encoder-decoder); this model is an encoder")
