"""The README's tour, line by line: each line composes and validates on a fresh install of the first
setup command (lmkit alone), or says which plugin it needs and fails naming that plugin."""
from __future__ import annotations

import re
import shlex

import pytest

from lmkit_test_utils import REPO


def tour_lines() -> list[tuple[list[str], str | None]]:
    text = (REPO / "README.md").read_text()
    block = text.split("## A tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = []
    for raw in block.strip().splitlines():
        command, _, comment = raw.partition("#")
        words = shlex.split(command)
        needs = re.search(r"needs plugins/(lmkit-[a-z]+)", comment)
        args = words[words.index("lmkit") + 1:]
        lines.append((args, needs.group(1) if needs else None))
    return lines


LINES = tour_lines()


def test_tour_has_lines():
    assert len(LINES) >= 10


@pytest.fixture
def no_plugins(monkeypatch):
    from lmkit import plugins

    bare = plugins.PluginManager(load_entry_points=False)
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: bare)


def _check(args, capsys):
    from lmkit.cli import main

    capsys.readouterr()
    verb_only = bool(args) and "=" not in args[0]  # plugins, --help
    rc = main(args if verb_only else args + ["--cfg", "job"])  # compose and validate, do not train
    return rc, capsys.readouterr()


@pytest.mark.parametrize("args, needs", LINES, ids=[" ".join(a) or "(no arguments)" for a, _ in LINES])
def test_tour_line_on_lmkit_alone(tmp_path, monkeypatch, capsys, no_plugins, args, needs):
    monkeypatch.chdir(tmp_path)
    rc, out = _check(args, capsys)
    if needs is None:
        assert rc == 0, out.err[-2000:]
    else:
        assert rc == 2 and f"comes with the {needs} plugin, which is not installed" in out.err, out.err[-2000:]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, needs", [line for line in LINES if line[1]], ids=[" ".join(a) for a, n in LINES if n])
def test_tour_line_with_its_plugin(tmp_path, monkeypatch, capsys, args, needs):
    from lmkit.plugins import get_plugin_manager

    if not any(prov[0] == needs for prov in get_plugin_manager()._provider.values()):
        pytest.skip(f"{needs} is not installed")
    monkeypatch.chdir(tmp_path)
    rc, out = _check(args, capsys)
    assert rc == 0, out.err[-2000:]
