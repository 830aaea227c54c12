"""The exportable families, by lmkit architecture name and by HF ``model_type``."""
from __future__ import annotations

import importlib

from lmkit.errors import ConfigError

#: lmkit architecture -> module of lmkit.interop holding its FAMILY
MODULES = {"gpt": "gpt", "bert": "bert", "albert": "albert", "t5": "t5", "bart": "bart", "llama": "llama"}


def family_of(architecture: str):
    """The :class:`~lmkit.interop.family.Family` of an lmkit architecture name."""
    if architecture not in MODULES:
        raise ConfigError(f"lmkit has no Hugging Face export for architecture '{architecture}'; it exports "
                          f"{', '.join(MODULES)}")
    return importlib.import_module(f"lmkit.interop.{MODULES[architecture]}").FAMILY


def families():
    return [family_of(a) for a in MODULES]


def family_of_model_type(model_type: str | None, path) -> object:
    """The family of an HF ``config.json``'s ``model_type``."""
    for family in families():
        if family.model_type == model_type:
            return family
    supported = ", ".join(f"{f.model_type} ({f.name})" for f in families())
    raise ConfigError(f"'{path}' holds a model of type '{model_type}', which lmkit cannot load; supported "
                      f"model types: {supported}")
