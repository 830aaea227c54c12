"""lmkit plugin entry point of the ``lmkit-retrieval`` distribution (entry-point group ``lmkit``).

* the ``retrieval`` verb: ``python -m lmkit retrieval build|search ...`` (:mod:`lmkit_retrieval.command`);
* the ``retro`` architecture and its ``model=retro_*`` presets (:mod:`lmkit_retrieval.retro`, ``conf/``).
"""
from __future__ import annotations

import lmkit


def _retrieval_verb(argv: list[str]) -> int:
    from lmkit_retrieval.command import main

    return main(argv)


@lmkit.hookimpl
def lmkit_register_commands():
    """``python -m lmkit retrieval build|search``: build a RETRO-style datastore, or query one."""
    return [lmkit.Component("retrieval", _retrieval_verb, None,
                            description="build a retrieval datastore (chunks, frozen-encoder embeddings, faiss index) "
                                        "or search one")]


@lmkit.hookimpl
def lmkit_register_architectures():
    """``model=retro_tiny`` / ``retro_small``: a GPT decoder with RETRO's chunked cross-attention
    (:mod:`lmkit_retrieval.retro`)."""
    from lmkit_retrieval.retro import RETRO, RETROConfig

    return [lmkit.Component("retro", RETRO, RETROConfig,
                            "RETRO-style decoder: chunked cross-attention to encoded retrieved neighbours",
                            meta={"kind": "decoder", "accepts": RETRO.accepts})]


@lmkit.hookimpl
def lmkit_register_objectives():
    """``+objective=retro_lm``: causal LM on ``retro`` with neighbours from a datastore (:mod:`lmkit_retrieval.objective`)."""
    from lmkit_retrieval.objective import RetroLM, RetroLMConfig

    return [lmkit.Component("retro_lm", RetroLM, RetroLMConfig, "causal LM with retrieved neighbours (RETRO)",
                            meta={"kinds": RetroLM.kinds, "default_model": "retro_tiny", "needs": RetroLM.needs_for})]


@lmkit.hookimpl
def lmkit_config_dirs():
    """``conf/model/retro_*.yaml``."""
    from pathlib import Path

    return [str(Path(__file__).parent / "conf")]
