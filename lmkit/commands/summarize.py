"""``python -m lmkit summarize MULTIRUN_DIR [sort=METRIC]``: a sweep's jobs, best first.

MULTIRUN_DIR is what ``python -m lmkit -m ...`` wrote (multirun/DATE/TIME). Prints one row per
job: the overrides that tell it apart from the other jobs, its last validation metrics
(val/loss, val/ppl, val/bpb where logged) and the steps it reached, sorted by val/loss; writes
the same table as summary.csv and summary.json in MULTIRUN_DIR. A job that failed (no run
directory), has no metrics log (logger other than csv) or never validated gets a row saying so,
after the others. The train verb prints this table at the end of every multirun (a job without a
csv log then shows the last validation its training reported).

Options (OPTION=VALUE):
  sort=val/loss   the metric to sort by (lowest first): val/loss, val/ppl, val/bpb, or job
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from lmkit.commands import split_options
from lmkit.errors import ConfigError, LmkitError, did_you_mean
from lmkit.runlog import MULTIRUN_CONFIG, distinguishing, multirun_jobs, read_run, write_atomic

USAGE = "usage: python -m lmkit summarize MULTIRUN_DIR [sort=val/loss|val/ppl|val/bpb|job]"
OPTIONS = ("sort",)
METRICS = ("val/loss", "val/ppl", "val/bpb")
SORT_KEYS = (*METRICS, "job")
COLUMNS = ("job", "status", "steps", *METRICS, "overrides", "run_dir")


def parse(argv: list[str]) -> tuple[Path, dict]:
    """The multirun directory and options of a ``summarize`` command line."""
    paths, options = split_options(argv, "summarize", OPTIONS, USAGE)
    sort = options.get("sort", "val/loss")
    if sort not in SORT_KEYS:
        raise ConfigError(f"summarize: sort={sort} is not a column to sort by.{did_you_mean(sort, SORT_KEYS)} "
                          f"Give one of {', '.join(SORT_KEYS)}")
    if len(paths) != 1:
        raise ConfigError(f"summarize takes one multirun directory (multirun/DATE/TIME), got {len(paths)}. {USAGE}")
    return Path(paths[0]), options


def _expected_jobs(sweep_dir: Path) -> list[list[str]]:
    """Each job's overrides as the sweep defined them (multirun.yaml), in Hydra's job order."""
    import yaml

    from lmkit.config.compose import expand_sweeps

    try:
        saved = yaml.safe_load((sweep_dir / MULTIRUN_CONFIG).read_text(encoding="utf-8"))
        task = [str(o) for o in saved["hydra"]["overrides"]["task"]]
        return expand_sweeps(task)
    except Exception:  # an unreadable or hand-edited multirun.yaml: the job directories still tell
        return []


def summarize(sweep_dir: str | Path, ends: dict[int, dict] | None = None) -> list[dict]:
    """One row per job of the multirun directory ``sweep_dir``, in job order (see :data:`COLUMNS`).

    ``ends``: by job number, the last validation a job's training reported (``step`` and
    metrics); it stands in for a job that has no csv log (the train verb passes it).
    """
    ends = ends or {}
    sweep_dir = Path(sweep_dir)
    jobs = multirun_jobs(sweep_dir) if sweep_dir.is_dir() else None
    if jobs is None:
        if multirun_jobs(sweep_dir.parent) is not None:
            raise ConfigError(f"{sweep_dir} is one job of the multirun {sweep_dir.parent}: give that directory")
        what = "does not exist" if not sweep_dir.exists() else f"is not a multirun directory (it has no {MULTIRUN_CONFIG})"
        raise ConfigError(f"{sweep_dir} {what}; give what python -m lmkit -m ... wrote: multirun/DATE/TIME")
    expected = _expected_jobs(sweep_dir)
    rows = []
    for num in sorted(set(jobs) | set(range(len(expected)))):
        row = {c: None for c in COLUMNS} | {"job": num, "overrides": expected[num] if num < len(expected) else []}
        if num not in jobs:
            rows.append(row | {"status": "failed: no run directory (refused or not run)"})
            continue
        row["run_dir"] = str(jobs[num])
        try:
            run = read_run(jobs[num])
        except LmkitError as e:
            if num in ends and "no metrics log" in str(e):
                end = ends[num]
                rows.append(row | {m: end.get(m) for m in METRICS} | {"steps": end.get("step"),
                                                                      "status": "ok (no metrics log)"})
            else:
                rows.append(row | {"status": "no metrics log" if "no metrics log" in str(e) else f"failed: {e}"})
            continue
        row["overrides"] = run.overrides or row["overrides"]
        steps = [p[-1][0] for p in run.series.values() if p]
        row["steps"] = max(steps) if steps else None
        last = {m: run.last(m) for m in METRICS}
        row |= {m: point[1] for m, point in last.items() if point is not None}
        max_steps = (run.config.get("trainer") or {}).get("max_steps")
        if row["val/loss"] is None:
            row["status"] = "no validation"
        elif isinstance(max_steps, int) and row["steps"] is not None and row["steps"] < max_steps:
            row["status"] = f"stopped at step {row['steps']} of {max_steps}"
        else:
            row["status"] = "ok"
        rows.append(row)
    if len(rows) > 1:  # a one-job sweep keeps all its overrides
        for row, shown in zip(rows, distinguishing([r["overrides"] for r in rows])):
            row["overrides"] = shown
    return rows


def sort_rows(rows: list[dict], key: str = "val/loss") -> list[dict]:
    """Rows with ``key`` lowest first, then the rows without it, in job order."""
    if key == "job":
        return sorted(rows, key=lambda r: r["job"])
    return sorted(rows, key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0, r["job"]))


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    header = ("job", *METRICS, "steps", "overrides / status")
    lines = [header]
    for r in rows:
        tail = " ".join(r["overrides"]) or "(no overrides)"
        if not r["status"].startswith("ok"):
            tail += f"  [{r['status']}]"
        lines.append((str(r["job"]), *(_fmt(r[m]) for m in METRICS), _fmt(r["steps"]), tail))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(line, widths)), line[-1]]).rstrip()
                     for line in lines)


def write_summary(rows: list[dict], sweep_dir: Path) -> list[Path]:
    """``summary.csv`` and ``summary.json`` in ``sweep_dir`` (each through a temporary file)."""
    csv_path, json_path = sweep_dir / "summary.csv", sweep_dir / "summary.json"

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for r in rows:
                writer.writerow(r | {"overrides": " ".join(r["overrides"])})

    write_atomic(csv_path, write_csv)
    write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8"))
    return [csv_path, json_path]


def report(sweep_dir: str | Path, sort: str = "val/loss", ends: dict[int, dict] | None = None) -> str:
    """Summarize ``sweep_dir``, write its summary files; return the table with where they went."""
    rows = sort_rows(summarize(sweep_dir, ends), sort)
    written = write_summary(rows, Path(sweep_dir))
    return format_table(rows) + "\n" + f"written: {', '.join(str(p) for p in written)}"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    sweep_dir, options = parse(argv)
    print(report(sweep_dir, options.get("sort", "val/loss")), flush=True)
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    return str(value)
