"""The built wheel carries its config tree and corpus: a non-editable install runs from anywhere."""
from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest

from lmkit_test_utils import REPO, TINY


@pytest.mark.slow
def test_non_editable_install_runs_python_m_lmkit(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
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
    where = subprocess.run([str(py), "-c", "import lmkit, lmkit.conf_path as c; print(lmkit.__file__); print(c.core_conf_dir())"],
                           cwd=workdir, capture_output=True, text=True, env=env, timeout=120)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr  # the wheel, not the checkout
    assert "lmkit/conf" in where.stdout.splitlines()[1]
    out = subprocess.run([str(py), "-m", "lmkit", *TINY, "trainer.max_steps=2"], cwd=workdir, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "validation at end" in out.stdout


def test_pyproject_lists_every_lmkit_package():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lmkit").rglob("__init__.py")}
    assert found | {"lmkit.conf"} == listed
