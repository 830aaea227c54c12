"""Plugin manager: entry points, provenance, broken and conflicting plugins, listing."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lmkit.errors import ConfigError, PluginError
from lmkit.plugins import STRICT_ENV, PluginManager
from lmkit_test_utils import BROKEN_PLUGIN_SOURCE as BROKEN_SOURCE, DUP_PLUGIN_SOURCE as DUP_SOURCE


def test_builtins_register_through_hooks_with_provider():
    pm = PluginManager()
    for kind, name in [("objective", "causal_lm"), ("architecture", "gpt"), ("optimizer", "adafactor"),
                       ("scheduler", "cosine"), ("strategy", "ddp"), ("tokenizer", "bpe"), ("dataset", "jsonl"),
                       ("callback", "token_throughput")]:
        assert pm.get(kind, name).provider == "lmkit"


def test_unknown_name_suggests_and_lists_providers():
    pm = PluginManager()
    with pytest.raises(ConfigError) as e:
        pm.get("optimizer", "adamww")
    msg = str(e.value)
    assert "Did you mean 'adamw'?" in msg
    assert "sgd (lmkit)" in msg and "adafactor (lmkit)" in msg


def test_third_party_plugin_adds_components_and_configs(example_plugin):
    pm = PluginManager()
    objective = pm.get("objective", "reverse_lm")
    assert (objective.provider, objective.version) == ("lmkit-example", "0.1.0")
    assert pm.get("optimizer", "signsgd").provider == "lmkit-example"
    assert any(d.endswith("example_plugin_conf") for d in pm.config_dirs())
    assert "reverse_lm" in pm.listing() and "lmkit-example 0.1.0" in pm.listing()


def test_duplicate_name_from_two_distributions_names_both(fake_plugin):
    fake_plugin("lmkit-dup", "lmkit_test_dup", DUP_SOURCE, version="2.0")
    with pytest.raises(PluginError) as e:
        PluginManager()
    msg = str(e.value)
    assert "optimizer 'adamw'" in msg and "lmkit" in msg and "lmkit-dup 2.0" in msg


def test_same_object_registered_twice_is_not_an_error():
    from lmkit.registry import Component, Registry

    reg = Registry("optimizer")
    factory = object()
    reg.add(Component("x", factory, provider="a"))
    reg.add(Component("x", factory, provider="a"))
    assert reg.names() == ["x"]


def test_broken_plugin_warns_and_cli_keeps_working(fake_plugin, capsys):
    fake_plugin("lmkit-broken", "lmkit_test_broken", BROKEN_SOURCE, version="0.3")
    pm = PluginManager()
    warning = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warning) == 1, warning  # one line, not Python's two-line warnings output
    assert warning[0].startswith("lmkit: warning: plugin 'lmkit_test_broken' from lmkit-broken 0.3 failed to load: "
                                 "ModuleNotFoundError"), warning
    assert pm.get("optimizer", "adamw")
    assert "failed plugins" in pm.listing()
    with pytest.raises(ConfigError) as e:
        pm.get("objective", "brokens_objective")
    assert "lmkit-broken 0.3 failed to load" in str(e.value)


def test_strict_mode_turns_broken_plugin_into_error(fake_plugin, monkeypatch):
    fake_plugin("lmkit-broken", "lmkit_test_broken2", BROKEN_SOURCE)
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match="strict mode"):
        PluginManager()


def test_listing_command_shows_components_and_failures(fake_plugin):
    fake_plugin("lmkit-broken", "lmkit_test_broken3", BROKEN_SOURCE, version="0.9")
    out = subprocess.run([sys.executable, "-m", "lmkit", "plugins"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "objectives:" in out.stdout and "causal_lm" in out.stdout and "lmkit " in out.stdout
    assert "lmkit-broken 0.9 failed to load" in out.stdout
    out2 = subprocess.run([sys.executable, "-m", "lmkit.plugins"], capture_output=True, text=True, timeout=120)
    assert out2.returncode == 0 and "optimizers:" in out2.stdout
