"""Start-up time of the CLI: how long `pkd-cache --help`, a bad flag and `info` take next to a bare `python`.

    python benchmarks/bench_startup.py [--runs 5] [--tree [NAME=]DIR ...]

Each command runs as a fresh process, `--runs` times, round robin (so a busy moment slows every command alike);
the table gives the median wall time and the excess over `python -c pass`. The goal (issue 15): `--help` within
0.5 s of `python -c pass`. `--tree before=DIR` adds columns for the pkd_cache of another checkout (e.g. the
commit before), run with PYTHONPATH=DIR. `info` and `verify` read a small store made with the tests' tiny teacher.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, table

from pkd_cache.testing import make_bert, make_store, write_sst2  # the tests' tiny teacher, data and store

REPO = Path(__file__).resolve().parents[1]

GOAL_S = 0.5


def small_store(tmp: Path) -> Path:
    teacher, data = make_bert(tmp / "teacher", layers=4, head=True), write_sst2(tmp / "SST-2", 64, 16)
    return make_store(tmp / "small.zarr", teacher, data, chunk_size=32)


def wall(argv: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tree", action="append", default=[], help="[NAME=]DIR: another checkout to time too.")
    a = p.parse_args()
    labels = {REPO: "this tree"}
    for spec in a.tree:
        name, _, folder = spec.rpartition("=")
        labels[Path(folder).resolve()] = name or Path(folder).name
    trees = list(labels)
    print(header())
    with tempfile.TemporaryDirectory() as d:
        store = small_store(Path(d))
        py = [sys.executable]
        cli = py + ["-m", "pkd_cache"]
        commands = {"python -c pass": py + ["-c", "pass"],
                    "pkd-cache --help": cli + ["--help"],
                    "pkd-cache distill --help": cli + ["distill", "--help"],
                    "pkd-cache distill ... --epochs abc (bad flag)": cli + ["distill", "--store", "x", "--output-dir",
                                                                           "y", "--epochs", "abc"],
                    "pkd-cache info <small store>": cli + ["info", str(store)],
                    "pkd-cache verify <small store>": cli + ["verify", str(store)]}
        times = {(name, t): [] for name in commands for t in trees}
        for _ in range(a.runs):
            for name, argv in commands.items():
                for t in trees:
                    times[name, t].append(wall(argv, t))
    med = {k: statistics.median(v) for k, v in times.items()}
    names = tuple(["command"] + [f"{labels[t]} (s)" for t in trees] + [f"{labels[t]}: over python (s)" for t in trees])
    rows = [(name, *(med[name, t] for t in trees), *(med[name, t] - med["python -c pass", t] for t in trees))
            for name in commands]
    print(f"median of {a.runs} runs each (wall time of a fresh process)\n")
    print(table(rows, names))
    over = med["pkd-cache --help", REPO] - med["python -c pass", REPO]
    print(f"\ngoal: `pkd-cache --help` within {GOAL_S} s of `python -c pass`: {over:.3f} s, "
          f"{'met' if over <= GOAL_S else 'NOT met'}")


if __name__ == "__main__":
    main()
