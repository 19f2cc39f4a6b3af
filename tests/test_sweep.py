"""`pkd-cache sweep`: a grid from one store, students sharing passes, resumable, with results.csv, table and plot."""
import csv

import pytest
from pkd_cache.testing import cli_in_process, show

import pkd_cache


def sweep_args(store, out, init, *grid, extra=()):
    args = ["sweep", "--store", store, "--student-init", init, "--output-dir", out, "--student-layers", "2",
            "--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-3", *extra]
    for g in grid:
        args += ["--grid", g]
    return args


def read_rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_grid_runs_every_combination_then_resumes(store_path, backbone_dir, tmp_path):
    out = tmp_path / "runs"
    args = sweep_args(store_path, out, backbone_dir, "alpha=0,0.5", "strategy=skip,last", "paper_beta=0,100",
                      extra=["--students-per-pass", "4", "--student-layers", "3"])
    p = cli_in_process(*args)
    assert p.returncode == 0, show(p)
    rows = read_rows(out)
    assert len(rows) == 8 and {r["run"] for r in rows} == {
        f"alpha={a}_strategy={s}_paper_beta={b}" for a in ("0", "0.5") for s in ("skip", "last") for b in ("0", "100")}
    for r in rows:
        assert 0 <= float(r["best"]) <= 1 and r["metric"] == "validation_accuracy"
        assert float(r["beta"]) == pytest.approx(float(r["grid_paper_beta"]) / 32)  # the teacher is 32 wide
        assert r["layer_map"] == ("2 3" if r["strategy"] == "last" else "1 2")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best 8 of 8 runs" in p.stdout
    for r in rows:  # each student's share of its pass, and the pass's time (4 students per pass)
        assert r["pass_students"] == "4" and float(r["share_seconds"]) == pytest.approx(
            float(r["wall_seconds"]) / 4, abs=0.06)
    assert "share: a run's part of its pass's time" in " ".join(p.stdout.split())
    assert "sweep pass 2/2" in p.stderr  # 8 runs, 4 per pass

    stamps = {r: (out / r / "metrics.json").stat().st_mtime_ns for r in (x["run"] for x in rows)}
    (out / rows[0]["run"] / "metrics.json").unlink()  # as if that run had been interrupted
    p = cli_in_process(*args)
    assert p.returncode == 0 and "7 already done, 1 to train" in p.stderr, show(p)
    for run, stamp in stamps.items():
        if run != rows[0]["run"]:
            assert (out / run / "metrics.json").stat().st_mtime_ns == stamp  # untouched
    assert len(read_rows(out)) == 8


@pytest.mark.parametrize("grid, says", [
    ("alph=0.1", "unknown setting 'alph'"),
    ("alpha=0.1,x", "'x' is not a float"),
    ("alpha", "expected NAME=V1,V2"),
    ("alpha=", "no values"),
    ("alpha=1.5", "--alpha must be in [0, 1]"),
    ("strategy=skip,middle", "--strategy must be 'skip' or 'last'"),
])
def test_bad_grids_are_one_line_errors(store_path, backbone_dir, tmp_path, grid, says):
    p = cli_in_process(*sweep_args(store_path, tmp_path / "runs", backbone_dir, grid))
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)
    assert not (tmp_path / "runs" / "results.csv").exists()


@pytest.mark.slow
def test_shards_split_the_grid_and_collect_merges_them(store_path, backbone_dir, tmp_path):
    """Two shards started at once on one runs folder (as a 2-job SLURM array) train disjoint halves; --collect
    names what is missing until both are done, then writes the table of all four runs."""
    import subprocess
    import sys

    from pkd_cache.testing import cli_env

    out = tmp_path / "runs"
    grid = ("alpha=0,0.5", "paper_beta=0,100")
    args = sweep_args(store_path, out, backbone_dir, *grid, extra=["--max-steps", "3"])
    first = cli_in_process(*args, "--shard", "0/2")
    assert first.returncode == 0 and "4 runs (shard 0/2: 2 of them)" in first.stderr, show(first)
    trained = {r["run"] for r in read_rows(out)}
    assert trained == {"alpha=0_paper_beta=0", "alpha=0.5_paper_beta=0"}  # grid indices 0 and 2
    p = cli_in_process("sweep", "--collect", out)
    assert p.returncode == 0 and "2 of 4 runs finished" in p.stderr, show(p)
    assert "alpha=0_paper_beta=100 (shard 1/2)" in p.stderr and "alpha=0.5_paper_beta=100 (shard 1/2)" in p.stderr

    (out / "alpha=0_paper_beta=0" / "metrics.json").unlink()  # shard 0 must redo it, shard 1 must not touch it
    procs = [subprocess.Popen([sys.executable, "-m", "pkd_cache", *map(str, args), "--shard", s], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in ("0/2", "1/2")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "1 already done, 1 to train" in outs[0][1] and "0 already done, 2 to train" in outs[1][1]
    p = cli_in_process("sweep", "--collect", out)
    assert p.returncode == 0 and "all 4 runs finished" in p.stderr and "best 4 of 4 runs" in p.stdout, show(p)
    assert {r["run"] for r in read_rows(out)} == {f"alpha={a}_paper_beta={b}" for a in ("0", "0.5")
                                                  for b in ("0", "100")}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # every shard's writes were atomic renames


@pytest.mark.parametrize("extra, says", [
    (["--shard", "2/2"], "--shard '2/2': expected I/N with 0 <= I < N"),
    (["--shard", "x"], "--shard 'x': expected I/N"),
    (["--collect", "{tmp}/nowhere"], "no sweep.json there"),
])
def test_bad_shards_and_collects_are_one_line_errors(store_path, backbone_dir, tmp_path, extra, says):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["sweep", *extra] if extra[0] == "--collect" else sweep_args(store_path, tmp_path / "runs", backbone_dir,
                                                                         "alpha=0,0.5", extra=extra)
    p = cli_in_process(*args)
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)


def test_a_shard_refuses_a_folder_holding_another_sweep(store_path, backbone_dir, tmp_path):
    out = tmp_path / "runs"
    p = cli_in_process(*sweep_args(store_path, out, backbone_dir, "alpha=0,0.5", extra=["--max-steps", "1"]),
                       "--shard", "1/2")
    assert p.returncode == 0, show(p)
    p = cli_in_process(*sweep_args(store_path, out, backbone_dir, "alpha=0.2,0.7", extra=["--max-steps", "1"]),
                       "--shard", "0/2")
    assert p.returncode == 2 and "holds another sweep" in p.stderr, show(p)


def test_the_plot_has_a_title_baselines_and_a_panel_per_swept_setting(tmp_path, store_path):
    """Two settings swept (alpha, temperature) and one given a single value (seed): two panels, each with the best
    per value and the teacher's and majority class's dev accuracy as lines (from the store); a titled PNG."""
    import struct

    import numpy as np

    from pkd_cache.commands.sweep_report import baseline_lines, plot

    store = pkd_cache.open_store(str(store_path))
    lines = baseline_lines(store, "validation_accuracy")
    labels, logits = store.array("validation", "labels")[:], store.array("validation", "logits")[:]
    assert lines["teacher"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert lines["majority class"] == pytest.approx(np.bincount(labels).max() / len(labels))
    rows = [{"grid_alpha": a, "grid_temperature": t, "grid_seed": 0, "best": 0.5 + a / 10 + t / 100,
             "metric": "validation_accuracy"} for a in (0.0, 0.5) for t in (1, 10)]
    png = tmp_path / "sweep.png"
    fig = plot(png, rows, ["alpha", "temperature", "seed"], lines)
    assert fig._suptitle.get_text() == "sweep: dev validation_accuracy of 4 run(s)"
    assert [ax.get_xlabel() for ax in fig.axes] == ["alpha", "temperature"]  # no panel for seed
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]  # the best per value, the teacher, the majority class
    assert fig.axes[0].get_legend_handles_labels()[1] == ["best", f"teacher {lines['teacher']:.3f}", f"majority class {lines['majority class']:.3f}"]
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (880, 396)  # 8 x 3.6 in at 110 dpi


def test_a_sweep_takes_the_trainer_options_distill_takes(store_path, backbone_dir, tmp_path):
    """The options distill gained for Trainer users reach every run of a sweep (here: the schedule, the eval
    strategy and bf16), and a run resumed later compares them as it compares every setting."""
    import json

    out = tmp_path / "runs"
    p = cli_in_process(*sweep_args(store_path, out, backbone_dir, "alpha=0,0.5", extra=[
        "--lr-scheduler-type", "cosine", "--eval-strategy", "no", "--bf16", "--max-steps", "2"]))
    assert p.returncode == 0, show(p)
    for run in ("alpha=0", "alpha=0.5"):
        m = json.loads((out / run / "metrics.json").read_text())
        assert m["config"]["bf16"] is True and m["config"]["train"]["lr_scheduler_type"] == "cosine"
        assert [h["step"] for h in m["history"]] == [2]
    p = cli_in_process(*sweep_args(store_path, out, backbone_dir, "alpha=0,0.5", extra=[
        "--lr-scheduler-type", "cosine", "--eval-strategy", "no", "--bf16", "--max-steps", "2"]))
    assert p.returncode == 0 and "2 already done, 0 to train" in " ".join(p.stderr.split()), show(p)


@pytest.mark.parametrize("grid, says", [
    ("student_layers=2,9", "run student_layers=9: a 9-layer student is deeper than the store's 4-layer teacher"),
])
def test_every_run_is_checked_against_the_store_before_the_first_trains(store_path, backbone_dir, tmp_path, grid,
                                                                        says):
    """A value only the store can refuse (more student layers than the teacher has) fails the sweep with one line
    before any run trains, not after the runs before it have."""
    out = tmp_path / "runs"
    p = cli_in_process(*sweep_args(store_path, out, backbone_dir, grid))
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)
    assert not any(out.glob("*/metrics.json")) and not any(out.glob("*/model.safetensors")), sorted(out.rglob("*"))
