"""``python -m lmkit summarize MULTIRUN_DIR``, and the same table at the end of every multirun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmkit_test_utils import TINY
from runlog_test_utils import cli, one_error, read_csv, write_multirun, write_run


def table_rows(out: str) -> list[list[str]]:
    """The data rows of the printed table (the lines after its header, up to 'written:')."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job "))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("written:"):
            break
        rows.append(line.split())
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-job multirun (tiny); the higher learning rate ends with the lower val/loss."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "sweep"
    args = ["-m", "optimizer.lr=1e-3,3e-3", *[a for a in TINY if not a.startswith("logger=")],
            f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=root, capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir, out.stdout


def test_multirun_ends_with_its_table_best_first(sweep):
    sweep_dir, stdout = sweep
    assert f"sweep summary ({sweep_dir})" in stdout
    rows = table_rows(stdout.split("sweep summary", 1)[1])
    assert [(r[0], r[-1]) for r in rows] == [("1", "optimizer.lr=0.003"), ("0", "optimizer.lr=0.001")]
    assert (sweep_dir / "summary.csv").is_file() and (sweep_dir / "summary.json").is_file()


def test_summarize_lists_each_job_with_its_last_validation(sweep, capsys):
    sweep_dir, _ = sweep
    rc, out, err = cli(["summarize", str(sweep_dir)], capsys)
    assert rc == 0, err
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["job"] for r in rows] == ["1", "0"]
    assert [float(r["val/loss"]) for r in rows] == sorted(float(r["val/loss"]) for r in rows)
    for r in rows:
        log = read_csv(sweep_dir / r["job"] / "logs" / "metrics.csv")
        last_val = [row for row in log if row["val/loss"]][-1]
        for metric in ("val/loss", "val/ppl", "val/bpb"):
            assert float(r[metric]) == pytest.approx(float(last_val[metric]))
        assert r["status"] == "ok" and r["steps"] == "4"
        assert r["overrides"] == f"optimizer.lr={'0.003' if r['job'] == '1' else '0.001'}"
    assert [r["job"] for r in json.loads((sweep_dir / "summary.json").read_text())] == [1, 0]
    printed = table_rows(out)
    assert [r[0] for r in printed] == ["1", "0"]
    assert printed[0][1] == f"{float(rows[0]['val/loss']):.4f}"
    assert not [p for p in sweep_dir.iterdir() if ".tmp" in p.name]


def test_failed_and_unvalidated_jobs_get_a_row_after_the_others(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    write_multirun(sweep_dir, ["optimizer.lr=0.001,0.002,0.003,0.004", "trainer.max_steps=6"])
    write_run(sweep_dir / "0", overrides=["optimizer.lr=0.001", "trainer.max_steps=6"], lr=1e-3)
    # job 1 was refused: its directory was removed
    write_run(sweep_dir / "2", overrides=["optimizer.lr=0.003", "trainer.max_steps=6"], validate=False)
    write_run(sweep_dir / "3", overrides=["optimizer.lr=0.004", "trainer.max_steps=6"], lr=4e-3)
    rc, out, err = cli(["summarize", str(sweep_dir)], capsys)
    assert rc == 0, err
    rows = {r["job"]: r for r in read_csv(sweep_dir / "summary.csv")}
    assert list(rows) == ["3", "0", "1", "2"]  # best first, then the jobs without val/loss in job order
    assert rows["1"]["status"] == "failed: no run directory (refused or not run)"
    assert rows["1"]["overrides"] == "optimizer.lr=0.002"  # from the sweep's own definition
    assert rows["2"]["status"] == "no validation" and rows["2"]["val/loss"] == ""
    assert rows["0"]["status"] == "ok" and rows["0"]["steps"] == "6"
    assert "[failed: no run directory" in out and "[no validation]" in out


def test_a_job_without_csv_log_or_cut_short_says_so(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    write_multirun(sweep_dir, ["seed=1,2"])
    write_run(sweep_dir / "0", overrides=["seed=1"], logger="none")
    points = write_run(sweep_dir / "1", overrides=["seed=2"], steps=4)
    (sweep_dir / "1" / "config.yaml").write_text((sweep_dir / "1" / "config.yaml").read_text()
                                                 .replace("max_steps: 4", "max_steps: 10"))
    rc, _, err = cli(["summarize", str(sweep_dir), "sort=job"], capsys)
    assert rc == 0, err
    rows = read_csv(sweep_dir / "summary.csv")
    assert [r["status"] for r in rows] == ["no metrics log", "stopped at step 4 of 10"]
    assert float(rows[1]["val/loss"]) == pytest.approx(points["val/loss"][-1][1])


def test_the_train_verbs_own_results_stand_in_for_a_missing_csv_log(tmp_path):
    from lmkit.commands.summarize import summarize

    sweep_dir = tmp_path / "sweep"
    write_multirun(sweep_dir, ["seed=1,2"])
    write_run(sweep_dir / "0", overrides=["seed=1"], logger="none")
    write_run(sweep_dir / "1", overrides=["seed=2"], logger="none")
    rows = summarize(sweep_dir, ends={0: {"step": 6, "val/loss": 4.5, "val/ppl": 90.0}})
    assert [(r["job"], r["status"], r["val/loss"], r["steps"]) for r in rows] == [
        (0, "ok (no metrics log)", 4.5, 6), (1, "no metrics log", None, None)]


@pytest.mark.parametrize("args, expected", [
    (["{tmp}"], "is not a multirun directory (it has no multirun.yaml)"),
    (["{tmp}/nowhere"], "does not exist"),
    (["{tmp}/sweep/0"], "is one job of the multirun"),
    ([], "summarize takes one multirun directory"),
    (["{tmp}/sweep", "{tmp}/sweep"], "summarize takes one multirun directory"),
    (["{tmp}/sweep", "sort=val/los"], "Did you mean 'val/loss'?"),
    (["{tmp}/sweep", "order=job"], "unknown option 'order'"),
], ids=["not-a-multirun", "missing", "a-job", "none", "two", "bad-sort", "unknown-option"])
def test_bad_input_is_one_line(tmp_path, capsys, args, expected):
    write_multirun(tmp_path / "sweep", ["seed=1"])
    write_run(tmp_path / "sweep" / "0", overrides=["seed=1"])
    rc, _, err = cli(["summarize", *(a.format(tmp=tmp_path) for a in args)], capsys)
    one_error(rc, err, expected)
    assert not (tmp_path / "sweep" / "summary.csv").exists()


def test_help_names_the_options(capsys):
    rc, out, _ = cli(["summarize", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: python -m lmkit summarize")
    assert "sort=val/loss" in out and "summary.csv" in out
