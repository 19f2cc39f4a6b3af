"""B6: peak RSS of dump and of distill at N and 10 N examples (memory must stay flat as the data grows).

    python benchmarks/bench_memory.py [--examples 2000] [--steps 100]

Each run is a fresh `pkd-cache` process; its peak RSS is read from the kernel (getrusage of the finished child).
The teacher is the real MiniLM-L6 with a 2-label head (N train examples and the 872 dev examples); distill
trains a 3-layer PKD-skip student for `--steps` steps from each store and evaluates it (student memory does not
depend on the data; reading the store is what could grow).
Goal: growth <= 10% from N to 10 N.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from common import teacher_workspace, GLUE, header, minilm, table


def peak_rss_mib(args: list[str]) -> float:
    """Run `python -m pkd_cache ARGS` to the end; its own peak resident set size in MiB (wait4's rusage)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pkd_cache", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"pkd-cache {args[0]} failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args()
    print(header())
    rows = []
    with teacher_workspace() as (tmp, teacher):
        for n in (a.examples, 10 * a.examples):
            store = tmp / f"s{n}.zarr"
            dump = peak_rss_mib(["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(GLUE / "SST-2"),
                                 "--out", str(store), "--max-examples", str(n), "--max-seq-length", "64",
                                 "--chunk-size", "256"])  # N holds a full shuffle group (8 chunks) already
            distill = peak_rss_mib(["distill", "--store", str(store), "--student-layers", "3", "--student-init",
                                    minilm(), "--max-steps", str(a.steps), "--logging-steps", "0",
                                    "--output-dir", str(tmp / f"student{n}")])
            rows.append((n, dump, distill))
    (n1, d1, s1), (n2, d2, s2) = rows
    rows = [("dump", d1, d2, f"{100 * (d2 / d1 - 1):+.1f}%", "<= +10%"),
            ("distill", s1, s2, f"{100 * (s2 / s1 - 1):+.1f}%", "<= +10%")]
    print(table(rows, ("stage", f"peak RSS MiB at N={a.examples:,}", f"at 10 N={10 * a.examples:,}", "growth",
                       "goal")))


if __name__ == "__main__":
    main()
