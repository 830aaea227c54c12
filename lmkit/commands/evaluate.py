"""``python -m lmkit evaluate MODEL [data=... data.path=...] [tasks=[...]] [eval.OPTION=VALUE ...]``.

MODEL is an lmkit run directory (its newest checkpoint), a checkpoint inside one, or a local
Hugging Face model directory. Without data overrides a run is scored on its own validation
split; ``data=text data.path=FILE`` (any data source, as in training) scores another corpus,
every token once. Decoders use a sliding window (eval.stride); encoders and encoder-decoders
their objective's loss, or pseudo-perplexity (eval.pseudo_perplexity=true, encoders).
tasks=[name or task.yaml, ...] scores few-shot tasks (eval.num_fewshot=k). Results are printed
as a table and written as JSON (eval.output=PATH; default RUN_DIR/eval/evaluate-TIME.json).

Options:
  eval.seq_len=N            window / block length (default: the run's data.seq_len; HF dirs: the model's max)
  eval.stride=N             decoders: new targets per window (default seq_len/2; seq_len = disjoint windows)
  eval.split=all|train|val  part of the corpus (default: val for the run's own data, else all)
  eval.max_tokens=N         score only the first N tokens
  eval.batch_size=8         rows per forward pass
  eval.pseudo_perplexity=false
  eval.seed=1234            objective noise and few-shot draws
  eval.num_fewshot=0        examples in each task prompt
  eval.limit=N              documents per task
  eval.output=PATH          the JSON file
  eval.corpus=true|false    score a corpus (default: true unless only tasks are given)
  device=auto               cpu, cuda, cuda:1 ...
Shipped tasks: python -m lmkit evaluate --tasks
"""
from __future__ import annotations

import dataclasses
import sys

from lmkit.errors import ConfigError, did_you_mean

USAGE = "usage: python -m lmkit evaluate RUN_DIR|CHECKPOINT|HF_DIR [data=... data.path=...] [tasks=[...]] [eval.OPTION=VALUE ...]"


def _options():
    from lmkit.evaluation.run import EvalOptions

    return [f.name for f in dataclasses.fields(EvalOptions)]


def _value(key: str, raw: str):
    import yaml

    if key in ("output", "device", "split"):
        return raw
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if key == "tasks":
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"tasks={raw}: give a list, e.g. tasks=[shakespeare_next_line,arithmetic_2da]")
        return [str(v) for v in value]
    if key in ("pseudo_perplexity", "corpus"):
        if not isinstance(value, bool):
            raise ConfigError(f"eval.{key}={raw}: give true or false")
    return value


def parse(argv: list[str]):
    """(model path, options dict, data overrides)."""
    names = _options()
    model, options, data = None, {}, []
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"evaluate: unknown option {arg}; options are written key=value. {USAGE}")
            if model is not None:
                raise ConfigError(f"evaluate takes one model (got '{model}' and '{arg}'). {USAGE}")
            model = arg
            continue
        key, raw = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare == "data" or bare.startswith("data."):
            data.append(arg)
            continue
        if bare in ("tasks", "device"):
            options[bare] = _value(bare, raw)
            continue
        if bare.startswith("eval.") and bare[5:] in names and bare[5:] not in ("tasks", "device"):
            options[bare[5:]] = _value(bare[5:], raw)
            continue
        known = [f"eval.{n}" for n in names if n not in ("tasks", "device")] + ["tasks", "device", "data", "data.path"]
        raise ConfigError(f"evaluate: unknown option '{bare}'.{did_you_mean(bare, known)} Options: eval.OPTION "
                          f"({', '.join(n for n in names if n not in ('tasks', 'device'))}), tasks, device, data=..., "
                          f"data.KEY=...")
    if model is None:
        raise ConfigError(f"evaluate needs a model: a run directory, a checkpoint or a Hugging Face directory. {USAGE}")
    return model, options, data


def _list_tasks() -> int:
    from lmkit.evaluation.tasks import load_task, shipped_tasks

    for name in shipped_tasks():
        task = load_task(name)
        print(f"{name:<26} {task.output_type:<16} {len(task.docs)} documents")
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    if "--tasks" in argv:
        return _list_tasks()
    from lmkit.evaluation.run import EvalOptions, default_output, evaluate, format_results, write_json

    model, options, data = parse(argv)
    try:
        opts = EvalOptions(**options).check()
    except TypeError as e:
        raise ConfigError(f"evaluate: {e}") from None
    results = evaluate(model, opts, data)
    out = opts.output or default_output(results)
    write_json(out, results)
    print(format_results(results))
    print(f"results: {out}")
    sys.stdout.flush()
    return 0
