"""A run directory's logged metrics, read back (for ``lmkit plot`` and ``lmkit summarize``).

The csv logger writes ``RUN_DIR/logs/metrics.csv`` (one log of the whole run, resumed attempts
stitched in). Each row holds the metrics of one logging call: training rows carry
``global_step`` (optimizer steps done); validation rows do not, and Lightning's ``step`` column
holds one less than the steps done for a validation inside ``fit`` (every
``trainer.val_check_interval`` steps), the steps done for one outside it (at the start, and at
the end of a run whose last step is not a multiple of the interval).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy

from lmkit.errors import ConfigError

METRICS_LOG = Path("logs") / "metrics.csv"
RUN_CONFIG = "config.yaml"
MULTIRUN_CONFIG = "multirun.yaml"
#: the cumulative token count the compute_accounting callback logs
TOKENS_SEEN = "train/tokens_seen"


@dataclass
class RunLog:
    """The metrics of one run: ``series[name]`` is a list of ``(step, value)`` in logging order."""

    run_dir: Path
    config: dict
    overrides: list[str]
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last(self, name: str) -> tuple[int, float] | None:
        """The last ``(step, value)`` of metric ``name``, or None when it was never logged."""
        points = self.series.get(name)
        return points[-1] if points else None

    def steps_done(self) -> int | None:
        """The last optimizer step the log reaches (training rows), or None when it has none."""
        points = self.series.get("global_step")
        return points[-1][0] if points else None


def check_run_dir(path: str | Path) -> Path:
    """``path`` as an lmkit run directory (it holds ``config.yaml``); a ConfigError otherwise."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist: give a run directory (outputs/DATE/TIME)")
    if not p.is_dir():
        raise ConfigError(f"{path} is not a directory: give a run directory (outputs/DATE/TIME)")
    if not (p / RUN_CONFIG).is_file():
        raise ConfigError(f"{path} is not an lmkit run directory (it has no {RUN_CONFIG})")
    return p


def multirun_jobs(path: Path) -> dict[int, Path] | None:
    """The job directories of a Hydra multirun directory by job number (None: ``path`` is not one)."""
    if not (path / MULTIRUN_CONFIG).is_file():
        return None
    return dict(sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit()))


def read_run(run_dir: str | Path) -> RunLog:
    """The run's config, overrides and metrics; a ConfigError when it has no metrics log."""
    run_dir = check_run_dir(run_dir)
    config = _read_yaml(run_dir / RUN_CONFIG)
    config = config if isinstance(config, dict) else {}
    path = run_dir / METRICS_LOG
    if not path.is_file():
        logger = (config.get("logger") or {}).get("name", "?")
        raise ConfigError(f"{run_dir} has no metrics log ({METRICS_LOG}): it ran with logger={logger}; "
                          f"only the csv logger's log can be read (logger=csv, the default)")
    return RunLog(run_dir, config, read_overrides(run_dir), read_metrics(path, config.get("trainer")))


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with (Hydra's ``.hydra/overrides.yaml``)."""
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def read_metrics(path: Path, trainer: dict | None = None) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a Lightning metrics.csv as ``(optimizer step, value)`` points, blanks skipped.

    ``trainer``: the run's trainer config (``val_check_interval``, ``max_steps``,
    ``validate_at_start``), which places validation rows at the step they followed.
    """
    trainer = trainer or {}
    series: dict[str, list[tuple[int, float]]] = {}
    seen_any = False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            global_step, logged = _number(row.get("global_step")), _number(row.get("step"))
            if global_step is not None:
                step = int(global_step)
            elif logged is not None:
                step = _validation_step(int(logged), trainer, first=not seen_any)
            else:
                continue
            seen_any = True
            for name, raw in row.items():
                if name in (None, "step", "epoch"):
                    continue
                value = _number(raw)
                if value is not None:
                    series.setdefault(name, []).append((step, value))
    return series


def _validation_step(logged: int, trainer: dict, first: bool) -> int:
    """The optimizer steps done at a validation row whose ``step`` column reads ``logged``."""
    if first and logged == 0 and trainer.get("validate_at_start", True):
        return 0
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    in_fit = isinstance(interval, int) and interval > 0 and (logged + 1) % interval == 0
    if in_fit and not (isinstance(max_steps, int) and max_steps >= 0 and logged + 1 > max_steps):
        return logged + 1
    return logged


def tokens_per_step(config: dict) -> Callable[[int], float]:
    """Tokens seen after ``n`` steps, computed from the run's batch layout (its config.yaml).

    Counts ``data.batch_size × data.seq_len`` per micro-batch, the batch ramp's micro-batches
    per step, and ``devices × num_nodes`` replicas when ``trainer.devices`` is a number (one
    otherwise). Objectives whose inputs are not ``seq_len`` long make this an estimate.
    """
    from lmkit.data.sampler import StepBatchSampler

    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    devices = trainer.get("devices")
    world = devices * int(trainer.get("num_nodes") or 1) if isinstance(devices, int) and devices > 0 else 1
    sampler = StepBatchSampler(1, int(data.get("batch_size") or 1), int(data.get("grad_accum") or 1), 0,
                               world_size=world, ramp_start=int(data.get("batch_ramp_start") or 1),
                               ramp_steps=int(data.get("batch_ramp_steps") or 0))
    seq_len = int(data.get("seq_len") or 1)
    return lambda n: float(sampler.stream_offset(n) * seq_len)


def tokens_at(run: RunLog) -> Callable[[int], float]:
    """Tokens seen after ``n`` steps of ``run``: its logged ``train/tokens_seen`` where it has one.

    Between logged steps the count is interpolated; past the last one (a final validation) it
    grows as :func:`tokens_per_step` does. Without that metric (or with one that goes down):
    :func:`tokens_per_step` alone.
    """
    formula = tokens_per_step(run.config)
    seen = run.series.get(TOKENS_SEEN)
    if not seen or any(b[1] < a[1] or b[0] <= a[0] for a, b in zip(seen, seen[1:])) or seen[0][0] <= 0:
        return formula
    steps, tokens = [0, *(s for s, _ in seen)], [0.0, *(t for _, t in seen)]

    def at(n: int) -> float:
        if n <= steps[-1]:
            return float(numpy.interp(n, steps, tokens))
        return tokens[-1] * formula(n) / max(formula(steps[-1]), 1.0)
    return at


def distinguishing(overrides: list[list[str]]) -> list[list[str]]:
    """Each list without the overrides every list shares (what tells runs of a sweep apart)."""
    common = set.intersection(*(set(o) for o in overrides)) if overrides else set()
    return [[o for o in job if o not in common] for job in overrides]


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _number(raw) -> float | None:
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_yaml(path: Path):
    import yaml

    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
