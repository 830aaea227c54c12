"""Every command line ends in a result or one ``lmkit: error:`` line with exit status 2: verbs, help,
version, plugin failures, options of plugins that are not installed, sweeps checked job by job."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lmkit_test_utils import BROKEN_PLUGIN_SOURCE as BROKEN_SOURCE, DUP_PLUGIN_SOURCE as DUP_SOURCE, TINY

VERB_SOURCE = """
import lmkit
from lmkit.errors import ConfigError

def hello(argv):
    if argv == ["bad"]:
        raise ConfigError("hello does not take 'bad'")
    print("hello", *argv)
    return 0

@lmkit.hookimpl
def lmkit_register_commands():
    return [lmkit.Component("hello", hello, description="says hello")]
"""


def run_cli(args, cwd, env=None, timeout=300):
    import os

    return subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error(out, expected: str) -> str:
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("lmkit: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def fresh_pm():
    from lmkit.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()
    yield
    get_plugin_manager.cache_clear()


def in_process(args, capsys):
    from lmkit.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- section 1: one error handler for every verb ------------------------------------------------
@pytest.mark.parametrize("verb", [[], ["plugins"], ["train"], ["--help"], ["--version"]])
def test_strict_mode_broken_plugin_is_one_line_for_every_verb(tmp_path, fake_plugin, verb):
    fake_plugin("lmkit-broken", "lmkit_test_broken_strict", BROKEN_SOURCE, version="0.3")
    out = run_cli(verb + (TINY if verb in ([], ["train"]) else []), tmp_path, env={"LMKIT_STRICT_PLUGINS": "1"})
    one_error(out, "lmkit-broken 0.3 failed to load: ModuleNotFoundError")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("verb", [[], ["plugins"]])
def test_two_distributions_with_one_name_is_one_line(tmp_path, fake_plugin, verb):
    fake_plugin("lmkit-dup", "lmkit_test_dup_cli", DUP_SOURCE, version="2.0")
    out = run_cli(verb + (TINY if not verb else []), tmp_path)
    one_error(out, "optimizer 'adamw' is registered twice: by lmkit")


def test_broken_plugin_warning_is_one_line_naming_distribution_version_error(tmp_path, fake_plugin):
    fake_plugin("lmkit-broken", "lmkit_test_broken_warn", BROKEN_SOURCE, version="0.7")
    out = run_cli(["plugins"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["lmkit: warning: plugin 'lmkit_test_broken_warn' from lmkit-broken 0.7 failed to load: "
                     "ModuleNotFoundError: No module named 'lmkit_this_module_does_not_exist'"], out.stderr


def test_listing_headings_are_plurals(capsys, fresh_pm):
    rc, out, _ = in_process(["plugins"], capsys)
    assert rc == 0
    assert "strategies:" in out and "strategys:" not in out and "model extensions:" in out


def test_unknown_command_suggests_the_right_one(capsys, fresh_pm):
    rc, _, err = in_process(["plugns"], capsys)
    assert rc == 2 and err.count("lmkit: error:") == 1
    assert "unknown command 'plugns'. Did you mean 'plugins'?" in err


def test_plugin_verb_runs_and_its_errors_are_one_line(tmp_path, fake_plugin):
    fake_plugin("lmkit-hello", "lmkit_test_hello", VERB_SOURCE)
    ok = run_cli(["hello", "world"], tmp_path)
    assert ok.returncode == 0 and "hello world" in ok.stdout, ok.stderr
    one_error(run_cli(["hello", "bad"], tmp_path), "hello does not take 'bad'")
    listed = run_cli(["--help"], tmp_path)
    assert "hello" in listed.stdout and "says hello" in listed.stdout


# -- section 3: help, version, uninstalled plugins ---------------------------------------------
def test_help_is_lmkits_own_with_every_installed_option(capsys, fresh_pm):
    from lmkit.plugins import get_plugin_manager

    rc, out, _ = in_process(["--help"], capsys)
    assert rc == 0 and out.startswith("usage: python -m lmkit")
    strategies = next(line for line in out.splitlines() if line.strip().startswith("strategy="))
    for name in get_plugin_manager().registries["strategy"].names():
        assert name in strategies
    assert "+objective=" in out and "span_corruption" in out and "plugins" in out
    assert "sweeps" not in out  # not a config group
    rc2, out2, _ = in_process(["train", "--help"], capsys)
    assert rc2 == 0 and out2 == out


def test_version_prints_lmkit_and_plugin_versions(capsys, fresh_pm):
    rc, out, _ = in_process(["--version"], capsys)
    assert rc == 0 and out.startswith("lmkit ") and "Hydra" not in out
    assert "torch " in out
    from lmkit.plugins import get_plugin_manager

    for dist, version in {p for p in get_plugin_manager()._provider.values() if p[0] != "lmkit"}:
        assert f"plugin {dist} {version}" in out


@pytest.fixture
def no_plugins(monkeypatch):
    """lmkit as the first README command installs it: no plugin distributions."""
    from lmkit import plugins

    bare = plugins.PluginManager(load_entry_points=False)
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: bare)
    return bare


@pytest.mark.parametrize("args, expected", [
    (["strategy=fsdp"], "strategy 'fsdp' comes with the lmkit-fsdp plugin, which is not installed. "
                        "Install it: pip install -e plugins/lmkit-fsdp"),
    (["strategy=fsdp_tp"], "lmkit-fsdp plugin"),
    (["strategy=pipeline"], "lmkit-pipeline plugin"),
    (["strategy=expert_parallel"], "lmkit-moe plugin"),
    (["model.moe.num_experts=4"], "'model.moe.num_experts' (model.moe.*) comes with the lmkit-moe plugin"),
    (["+model.moe.num_experts=4"], "comes with the lmkit-moe plugin"),
    (["callbacks=[moe_balance]"], "callback 'moe_balance' comes with the lmkit-moe plugin"),
])
def test_option_of_uninstalled_plugin_names_the_distribution(tmp_path, monkeypatch, capsys, no_plugins,
                                                             args, expected):
    monkeypatch.chdir(tmp_path)
    rc, _, err = in_process(TINY + args, capsys)
    assert rc == 2 and err.count("lmkit: error:") == 1, err
    assert expected in err and "Did you mean" not in err, err
    assert not (tmp_path / "outputs").exists()


def test_help_without_plugins_says_what_to_install(capsys, no_plugins):
    rc, out, _ = in_process(["--help"], capsys)
    assert rc == 0
    assert "Not installed" in out and "fsdp, fsdp_tp: pip install -e plugins/lmkit-fsdp" in out
    assert "moe" in out.split("Not installed", 1)[1]


# -- sweeps: every job checked before any runs --------------------------------------------------
def test_sweep_with_one_bad_job_trains_nothing_and_leaves_no_directory(tmp_path, monkeypatch, capsys, fresh_pm):
    monkeypatch.chdir(tmp_path)
    rc, out, err = in_process(["-m", "optimizer.lr=0.001,-1"] + TINY, capsys)
    assert rc == 2 and err.count("lmkit: error:") == 1, err
    assert "optimizer.lr must be positive" in err
    assert "trained" not in out
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_sweep_over_models_checks_each_combination(tmp_path, monkeypatch, capsys, fresh_pm):
    monkeypatch.chdir(tmp_path)
    rc, _, err = in_process(["-m", "model=gpt_tiny,bert_tiny", "data.seq_len=16"] + ["logger=none"], capsys)
    assert rc == 2 and "needs a decoder architecture" in err
    assert not (tmp_path / "multirun").exists()


def test_expand_sweeps_is_the_cartesian_product():
    from lmkit.config.compose import expand_sweeps

    jobs = expand_sweeps(["a=1", "optimizer.lr=1,2", "+b=x,y,z"])
    assert len(jobs) == 6
    assert jobs[0] == ["a=1", "optimizer.lr=1", "+b=x"] and jobs[-1] == ["a=1", "optimizer.lr=2", "+b=z"]
