"""The verbs of ``python -m lmkit [VERB] [ARGS]``: one module per verb, each with ``main(argv) -> int``.

A first word that is an override (``key=value``, ``+group=x``, ``~key``) or a flag means
``train``. Plugins add verbs through the ``lmkit_register_commands`` hook; built-in verbs
cannot be shadowed. Every verb raises :class:`lmkit.errors.LmkitError` for what the user can
fix; :func:`lmkit.cli.main` turns it into one ``lmkit: error:`` line and exit status 2.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from lmkit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    run: Callable[[list[str]], int]


def _lazy(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        return importlib.import_module(f"lmkit.commands.{module}").main(argv)
    return run


BUILTIN_VERBS = {
    "train": Verb("train", "compose a run from config groups and overrides, and train it (the default)", _lazy("train")),
    "export": Verb("export", "write a run's model as a Hugging Face directory (config.json, model.safetensors, tokenizer)", _lazy("export")),
    "generate": Verb("generate", "write text from a run's model or a Hugging Face directory, streamed (KV cache; sampling options)", _lazy("generate")),
    "plot": Verb("plot", "write PNG curves (loss, learning rate, throughput) of one or more runs' logged metrics", _lazy("plot")),
    "summarize": Verb("summarize", "a multirun's jobs with their overrides and final validation metrics, best first (summary.csv)", _lazy("summarize")),
    "evaluate": Verb("evaluate", "score a model on a corpus (perplexity, bits/byte) and on few-shot tasks; JSON + table", _lazy("evaluate")),
    "estimate": Verb("estimate", "FLOPs, time at an assumed MFU, energy and CO2e of a planned run (no model is built)", _lazy("estimate")),
    "optimize": Verb("optimize", "tokenize a corpus into a litdata token store (train/val shards) for data=litdata", _lazy("optimize")),
    "plugins": Verb("plugins", "list every component with its provider and version, and plugins that failed", _lazy("plugins")),
}


def all_verbs(pm=None) -> dict[str, Verb]:
    """Built-in verbs, then those registered by plugins (``pm``: the plugin manager, if already built)."""
    verbs = dict(BUILTIN_VERBS)
    if pm is not None:
        for c in pm.registries["command"]:
            if c.name not in verbs:
                verbs[c.name] = Verb(c.name, c.description or f"from {c.provider}", c.factory)
    return verbs


def is_verb_word(arg: str) -> bool:
    """A bare word (not an override, not a flag) in the verb position."""
    return bool(arg) and "=" not in arg and not arg.startswith(("-", "+", "~"))


def select_verb(argv: list[str], pm_factory) -> tuple[Verb, list[str]]:
    """The verb named by ``argv[0]`` (train when it names none) and the remaining arguments."""
    if not argv or not is_verb_word(argv[0]):
        return BUILTIN_VERBS["train"], argv
    word = argv[0]
    if word in BUILTIN_VERBS:
        return BUILTIN_VERBS[word], argv[1:]
    verbs = all_verbs(pm_factory())
    if word in verbs:
        return verbs[word], argv[1:]
    from lmkit.first_party import not_installed_message

    missing = not_installed_message(f"the command '{word}'", "command", word)
    if missing:
        raise ConfigError(missing)
    raise ConfigError(
        f"unknown command '{word}'.{did_you_mean(word, verbs)} Commands: {', '.join(verbs)}. "
        f"Training overrides are written key=value (e.g. trainer.max_steps=100); see python -m lmkit --help."
    )


def split_options(argv: list[str], verb: str, options, usage: str) -> tuple[list[str], dict[str, str]]:
    """A verb's arguments as positionals and ``OPTION=VALUE`` options; an unknown option or flag is a ConfigError."""
    positionals, given = [], {}
    for arg in argv:
        if "=" not in arg:
            if arg.startswith("-"):
                raise ConfigError(f"{verb}: unknown option {arg}; options are written key=value. {usage}")
            positionals.append(arg)
            continue
        key, value = arg.split("=", 1)
        if key not in options:
            raise ConfigError(f"{verb}: unknown option '{key}'.{did_you_mean(key, options)} Options: {', '.join(options)}")
        given[key] = value
    return positionals, given
