"""Where the core Hydra config tree lives: ``lmkit/conf`` in a wheel, top-level ``conf/`` in a checkout."""
from __future__ import annotations

from pathlib import Path


def core_conf_dir() -> Path:
    package = Path(__file__).parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"lmkit's config tree is missing (looked in {package / 'conf'} and {package.parent / 'conf'})")
