"""``python -m lmkit plot RUN_DIR [RUN_DIR ...] [out=DIR] [x=step|tokens]``: PNG curves of runs' metrics.

Reads each run's csv log (logs/metrics.csv, written by the default logger=csv) and writes:
  loss.png        train/loss (solid) and val/loss (dashed, dots)
  lr.png          train/lr
  throughput.png  train/tokens_per_s
Several runs are drawn on the same axes, each in its own colour; the legend names each run
by the overrides that tell it apart from the others (its directory when they do not).
A multirun directory (multirun/DATE/TIME) stands for all its jobs. A metric a run did not
log (no validation, no throughput callback) is left out with a note.

Options (OPTION=VALUE):
  out=DIR      where the PNGs go (default: RUN_DIR/plots for one run, MULTIRUN_DIR/plots for
               one multirun; required for several)
  x=step       the x axis: step (optimizer steps) or tokens (the run's logged train/tokens_seen;
               without it, steps × data.batch_size × data.seq_len × micro-batches × devices)
"""
from __future__ import annotations

import sys
from pathlib import Path

from lmkit.commands import split_options
from lmkit.errors import ConfigError, did_you_mean
from lmkit.runlog import RunLog, distinguishing, multirun_jobs, read_run, tokens_at, write_atomic

USAGE = "usage: python -m lmkit plot RUN_DIR|MULTIRUN_DIR [RUN_DIR ...] [out=DIR] [x=step|tokens]"
OPTIONS = ("out", "x")
X_AXES = ("step", "tokens")
#: file name -> (title, y label, [(metric, line style)])
FIGURES = {
    "loss": ("loss", "loss", [("train/loss", {"linestyle": "-"}),
                              ("val/loss", {"linestyle": "--", "marker": "o", "markersize": 3})]),
    "lr": ("learning rate", "lr", [("train/lr", {"linestyle": "-"})]),
    "throughput": ("throughput", "tokens/s", [("train/tokens_per_s", {"linestyle": "-"})]),
}


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """The run arguments and the options of a ``plot`` command line."""
    paths, options = split_options(argv, "plot", OPTIONS, USAGE)
    if options.get("x", "step") not in X_AXES:
        raise ConfigError(f"plot: x={options['x']} is not an x axis.{did_you_mean(options['x'], X_AXES)} "
                          f"Give x=step or x=tokens")
    if not paths:
        raise ConfigError(f"plot needs a run directory (outputs/DATE/TIME) or a multirun directory. {USAGE}")
    return paths, options


def load_runs(paths: list[str]) -> tuple[list[RunLog], list[str], Path | None]:
    """The runs named on the command line (a multirun: its jobs), notes, and the default output directory."""
    runs, notes = [], []
    for path in paths:
        jobs = multirun_jobs(Path(path))
        if jobs is None:
            runs.append(read_run(path))
            continue
        found = []
        for num, job in jobs.items():
            try:
                found.append(read_run(job))
            except ConfigError as e:  # a failed job or one without a csv log: the others are still worth a plot
                notes.append(f"job {num} left out: {e}")
        if not found:
            raise ConfigError(f"{path} is a multirun directory with no job that has a metrics log (logs/metrics.csv)")
        runs += found
    default_out = None
    if len(paths) == 1:
        default_out = Path(paths[0]) / "plots"
    return runs, notes, default_out


def run_labels(runs: list[RunLog]) -> list[str]:
    """Legend labels: the overrides that tell runs apart, or their directories when those do not."""
    if len(runs) > 1:
        labels = [" ".join(o) for o in distinguishing([r.overrides for r in runs])]
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return [str(r.run_dir) for r in runs]


def build_figures(runs: list[RunLog], x: str = "step") -> tuple[dict, list[str]]:
    """One matplotlib Figure per file name of :data:`FIGURES` that has data, and notes on what is missing."""
    from matplotlib.figure import Figure

    labels = run_labels(runs)
    to_x = [(tokens_at(r) if x == "tokens" else float) for r in runs]
    figures, notes = {}, []
    for name, (title, ylabel, metrics) in FIGURES.items():
        fig = Figure(figsize=(7, 4.5), dpi=100)
        ax = fig.add_subplot()
        drawn = 0
        for i, (run, label) in enumerate(zip(runs, labels)):
            colour = f"C{i % 10}"
            for metric, style in metrics:
                points = run.series.get(metric)
                if not points:
                    notes.append(f"{run.run_dir}: no {metric} logged; left out of {name}.png")
                    continue
                xs = [to_x[i](step) for step, _ in points]
                ax.plot(xs, [v for _, v in points], color=colour, label=f"{metric} {label}" if len(metrics) > 1
                        else label, **style)
                drawn += 1
        if not drawn:
            notes.append(f"no run logged {' or '.join(m for m, _ in metrics)}: {name}.png not written")
            continue
        ax.set_title(title)
        ax.set_xlabel("tokens" if x == "tokens" else "step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        figures[name] = fig
    return figures, notes


def save_figures(figures: dict, out: Path) -> list[Path]:
    """Write each figure as ``out/NAME.png`` (through a temporary file); return the paths."""
    from lmkit.config.schema import check_creatable_dir

    check_creatable_dir("out", out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        write_atomic(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip().replace("``", ""))
        return 0
    paths, options = parse(argv)
    runs, notes, default_out = load_runs(paths)
    out = Path(options["out"]) if options.get("out") else default_out
    if out is None:
        raise ConfigError(f"plot: several runs go in one set of plots: give out=DIR. {USAGE}")
    figures, more = build_figures(runs, options.get("x", "step"))
    for note in notes + more:
        print(f"lmkit: note: {note}")
    if not figures:
        raise ConfigError(f"nothing to plot: the metrics logs of {', '.join(paths)} hold no train/loss, val/loss, "
                          f"train/lr or train/tokens_per_s")
    for path in save_figures(figures, out):
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
