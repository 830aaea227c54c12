"""``python -m lmkit plot``: PNG curves of runs' logged metrics, the data drawn equal to the log."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmkit_test_utils import TINY
from runlog_test_utils import cli, one_error, read_csv, write_multirun, write_run

PNGS = {"loss.png", "lr.png", "throughput.png"}


def assert_png(path):
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something drawn, not a blank canvas


def lines_by_label(fig) -> dict[str, tuple[list, list]]:
    ax = fig.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One tiny real run with the csv logger, lr and throughput logged every step."""
    root = tmp_path_factory.mktemp("plot-run")
    run_dir = root / "run"
    args = [a for a in TINY if not a.startswith(("logger=", "callbacks="))]
    args += ["trainer.max_steps=5", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"]
    out = subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=root, capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_real_run_plots_every_curve_from_its_log(real_run, capsys):
    from lmkit.runlog import read_run

    rc, out, err = cli(["plot", str(real_run)], capsys)
    assert rc == 0, err
    plots = real_run / "plots"
    assert {p.name for p in plots.iterdir()} == PNGS  # no temporary files left
    for name in PNGS:
        assert_png(plots / name)
    rows = read_csv(real_run / "logs" / "metrics.csv")
    run = read_run(real_run)
    for metric in ("train/loss", "train/lr", "train/tokens_per_s", "val/loss"):
        logged = [float(r[metric]) for r in rows if r[metric]]
        assert [v for _, v in run.series[metric]] == pytest.approx(logged), metric
    assert [s for s, _ in run.series["train/loss"]] == [1, 2, 3, 4, 5]
    # validation at the start, every 2 steps in fit, and once more at the end (step 5)
    assert [s for s, _ in run.series["val/loss"]] == [0, 2, 4, 5]


def test_figures_draw_the_logged_points_labelled_by_overrides(tmp_path):
    from lmkit.commands.plot import build_figures
    from lmkit.runlog import read_run

    common = ["trainer.max_steps=6"]
    a = write_run(tmp_path / "a", overrides=[*common, "optimizer.lr=0.001"], lr=1e-3)
    b = write_run(tmp_path / "b", overrides=[*common, "optimizer.lr=0.003"], lr=3e-3)
    figures, notes = build_figures([read_run(tmp_path / "a"), read_run(tmp_path / "b")])
    assert set(figures) == {"loss", "lr", "throughput"} and notes == []
    loss = lines_by_label(figures["loss"])
    for label, points in (("optimizer.lr=0.001", a), ("optimizer.lr=0.003", b)):
        for metric in ("train/loss", "val/loss"):
            xs, ys = loss[f"{metric} {label}"]
            assert xs == [s for s, _ in points[metric]] and ys == pytest.approx([v for _, v in points[metric]])
        xs, ys = lines_by_label(figures["lr"])[label]
        assert ys == pytest.approx([v for _, v in points["train/lr"]])
        assert lines_by_label(figures["throughput"])[label][1] == pytest.approx(
            [v for _, v in points["train/tokens_per_s"]])
    # validation rows sit at the step they followed: start, every 2 steps
    assert [s for s, _ in a["val/loss"]] == [0, 2, 4, 6]


def test_runs_that_share_their_overrides_are_named_by_directory(tmp_path):
    from lmkit.commands.plot import run_labels
    from lmkit.runlog import read_run

    write_run(tmp_path / "a", overrides=["seed=1"])
    write_run(tmp_path / "b", overrides=["seed=1"])
    assert run_labels([read_run(tmp_path / "a"), read_run(tmp_path / "b")]) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_x_tokens_counts_batch_times_sequence(tmp_path):
    from lmkit.commands.plot import build_figures
    from lmkit.runlog import read_run

    points = write_run(tmp_path / "run", batch_size=4, seq_len=32, grad_accum=2)
    figures, _ = build_figures([read_run(tmp_path / "run")], x="tokens")
    xs, _ = lines_by_label(figures["lr"])[str(tmp_path / "run")]
    assert xs == [s * 4 * 32 * 2 for s, _ in points["train/lr"]]
    assert figures["lr"].axes[0].get_xlabel() == "tokens"


def test_x_tokens_follows_the_logged_token_count(tmp_path):
    """train/tokens_seen (e.g. two devices: twice what the config's batch says) wins over the estimate."""
    from lmkit.commands.plot import build_figures
    from lmkit.runlog import read_run

    points = write_run(tmp_path / "run", steps=5, val_every=2, batch_size=4, seq_len=32, tokens_per_step=256)
    figures, _ = build_figures([read_run(tmp_path / "run")], x="tokens")
    lines = lines_by_label(figures["loss"])
    label = str(tmp_path / "run")
    assert lines[f"train/loss {label}"][0] == [v for _, v in points["train/tokens_seen"]]
    # validations: at the start, after steps 2 and 4, and at the end (step 5)
    assert lines[f"val/loss {label}"][0] == [0, 512, 1024, 1280]


def test_missing_metrics_are_left_out_with_a_note(tmp_path, capsys):
    write_run(tmp_path / "run", validate=False, log_lr=False)
    rc, out, err = cli(["plot", str(tmp_path / "run")], capsys)
    assert rc == 0, err
    assert "no val/loss logged; left out of loss.png" in out
    assert "lr.png not written" in out
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} == {"loss.png", "throughput.png"}


def test_several_runs_need_out_and_go_there(tmp_path, capsys):
    write_run(tmp_path / "a", overrides=["seed=1"])
    write_run(tmp_path / "b", overrides=["seed=2"])
    rc, _, err = cli(["plot", str(tmp_path / "a"), str(tmp_path / "b")], capsys)
    one_error(rc, err, "give out=DIR")
    rc, out, err = cli(["plot", str(tmp_path / "a"), str(tmp_path / "b"), f"out={tmp_path / 'both'}"], capsys)
    assert rc == 0, err
    assert {p.name for p in (tmp_path / "both").iterdir()} == PNGS
    assert_png(tmp_path / "both" / "loss.png")


def test_a_multirun_directory_stands_for_its_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_multirun(sweep, ["seed=1,2,3"])
    write_run(sweep / "0", overrides=["seed=1"])
    write_run(sweep / "1", overrides=["seed=2"], logger="none")
    rc, out, err = cli(["plot", str(sweep)], capsys)
    assert rc == 0, err
    assert "job 1 left out" in out and "no metrics log" in out
    assert {p.name for p in (sweep / "plots").iterdir()} == PNGS


def test_a_failed_save_leaves_no_file(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    write_run(tmp_path / "run")

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    rc, _, err = cli(["plot", str(tmp_path / "run")], capsys)
    one_error(rc, err, "disk full")
    assert list((tmp_path / "run" / "plots").iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["{tmp}/nowhere"], "does not exist"),
    (["{tmp}"], "is not an lmkit run directory (it has no config.yaml)"),
    (["{tmp}/quiet"], "has no metrics log (logs/metrics.csv): it ran with logger=none"),
    (["{tmp}/ok", "xaxis=tokens"], "unknown option 'xaxis'"),
    (["{tmp}/ok", "x=token"], "Did you mean 'tokens'?"),
    (["{tmp}/ok", "--out"], "unknown option --out"),
    ([], "plot needs a run directory"),
], ids=["missing", "not-a-run", "no-metrics", "unknown-option", "bad-x", "flag", "no-run"])
def test_bad_input_is_one_line(tmp_path, capsys, args, expected):
    write_run(tmp_path / "quiet", logger="none")
    write_run(tmp_path / "ok")
    rc, _, err = cli(["plot", *(a.format(tmp=tmp_path) for a in args)], capsys)
    one_error(rc, err, expected)
    assert not (tmp_path / "ok" / "plots").exists()


def test_help_names_the_options(capsys):
    rc, out, _ = cli(["plot", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: python -m lmkit plot")
    assert "out=DIR" in out and "x=step" in out and "required for several" in out
