"""The built wheel carries its config tree and corpus: a non-editable install runs from anywhere."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from lmkit_test_utils import REPO, TINY


def _dependency_dirs() -> list[str]:
    """The site directories this interpreter imports lmkit's dependencies from.

    A venv's ``system_site_packages`` would point at the *base* interpreter's site-packages,
    which in a virtualenv or conda env does not hold them; so the test venv is given this
    interpreter's own directories instead, whatever kind of environment it is.
    """
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    dirs += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for i, d in enumerate(dirs) if d not in dirs[:i] and Path(d).is_dir()]


def make_test_venv(env_dir: Path) -> Path:
    """A venv without lmkit that sees the dependencies of the running interpreter (after its own packages)."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in _dependency_dirs())
    (Path(purelib) / "_outer_site.pth").write_text(lines)
    return py


def test_test_venv_sees_the_dependencies_but_not_lmkit(tmp_path):
    py = make_test_venv(tmp_path / "venv")
    out = subprocess.run([str(py), "-c", "import hydra, lightning, torch, sys; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(tmp_path / "venv") in out.stdout


@pytest.mark.slow
def test_non_editable_install_runs_python_m_lmkit(tmp_path):
    env_dir = tmp_path / "venv"
    py = make_test_venv(env_dir)
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("lmkit-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                              "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=300)
    if install.returncode != 0:  # older pip without --python: use the target's own pip if any
        install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import lmkit, lmkit.conf_path as c, lmkit.commands.train as t; "
                            "print(lmkit.__file__); print(c.core_conf_dir()); print(t.__file__)"],
                           cwd=workdir, capture_output=True, text=True, env=env, timeout=120)
    lines = where.stdout.splitlines()
    assert len(lines) == 3 and all(str(env_dir) in line for line in lines), where.stdout + where.stderr  # the wheel
    assert "lmkit/conf" in lines[1]
    out = subprocess.run([str(py), "-m", "lmkit", *TINY, "trainer.max_steps=2"], cwd=workdir, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation at end" in out.stdout


def test_pyproject_lists_every_lmkit_package():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lmkit").rglob("__init__.py")}
    assert found | {"lmkit.conf"} == listed
