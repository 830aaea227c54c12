"""lmkit's own plugin distributions, and what each provides.

Used to answer "where does this option come from?" when one of them is not installed:
``strategy=fsdp`` or ``model.moe.num_experts=4`` without the plugin then names the
distribution and the command that installs it, instead of suggesting a near-miss.
"""
from __future__ import annotations

# distribution -> {kind: [names]}; "group:<g>" are Hydra config options, "model_extension" model.<name> blocks
FIRST_PARTY: dict[str, dict[str, tuple[str, ...]]] = {
    "lmkit-fsdp": {"strategy": ("fsdp", "fsdp_tp")},
    "lmkit-pipeline": {"strategy": ("pipeline",)},
    "lmkit-moe": {"strategy": ("expert_parallel",), "model_extension": ("moe",), "callback": ("moe_balance",)},
    "lmkit-retrieval": {"command": ("retrieval",), "architecture": ("retro",), "model": ("retro_tiny", "retro_small")},
}


def install_hint(dist: str) -> str:
    """How to install a first-party plugin distribution."""
    return f"pip install -e plugins/{dist} (from the lmkit source tree)"


def provider_of(kind: str, name: str) -> str | None:
    """The first-party distribution that provides ``name`` of ``kind`` (or None)."""
    for dist, provides in FIRST_PARTY.items():
        if name in provides.get(kind, ()):
            return dist
    return None


def not_installed_message(what: str, kind: str, name: str) -> str | None:
    """``"<what> comes with the lmkit-x plugin, which is not installed: pip install ..."`` or None."""
    dist = provider_of(kind, name)
    if dist is None:
        return None
    return f"{what} comes with the {dist} plugin, which is not installed. Install it: {install_hint(dist)}."
