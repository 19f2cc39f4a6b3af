"""B6: peak RSS of dump and of distill at N and 10 N examples (memory must stay flat as the data grows).

    python benchmarks/bench_memory.py [--examples 2000] [--steps 100]

Each run is a fresh `pkd-cache` process; its peak RSS is read from the kernel (getrusage of the finished child).
The teacher is the real MiniLM-L6 with a 2-label head (N train examples and the 872 dev examples); distill
trains a 3-layer PKD-skip student for `--steps` steps from each store and evaluates it (student memory does not
depend on the data; reading the store is what could grow).
Goal: growth <= 10% from N to 10 N.

The RSS of the child is also sampled every 0.2 s: the highest sample of the first and of the second half of each
run are printed. glibc's heap takes a few thousand examples of varying-width teacher batches to reach its high-water
mark, so a short dump is still climbing when it ends (second half above the first); a long one is flat. Use an N
large enough that the N run is in that plateau: `--examples 6734` makes 10 N all of SST-2 train.
"""
from __future__ import annotations

import argparse
import sys

from common import teacher_workspace, GLUE, header, minilm, peak_rss_mib, table


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
            dump = peak_rss_mib([sys.executable, "-m", "pkd_cache", "dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(GLUE / "SST-2"),
                                 "--out", str(store), "--max-examples", str(n), "--max-seq-length", "64",
                                 "--chunk-size", "256"])  # N holds a full shuffle group (8 chunks) already
            distill = peak_rss_mib([sys.executable, "-m", "pkd_cache", "distill", "--store", str(store), "--student-layers", "3", "--student-init",
                                    minilm(), "--max-steps", str(a.steps), "--logging-steps", "0",
                                    "--output-dir", str(tmp / f"student{n}")])
            rows.append((n, dump, distill))
    (n1, d1, s1), (n2, d2, s2) = rows
    rows = [(stage, a1[0], a2[0], f"{100 * (a2[0] / a1[0] - 1):+.1f}%", "<= +10%", f"{a1[1]:.0f} / {a1[2]:.0f}",
             f"{a2[1]:.0f} / {a2[2]:.0f}") for stage, a1, a2 in (("dump", d1, d2), ("distill", s1, s2))]
    print(table(rows, ("stage", f"peak RSS MiB at N={a.examples:,}", f"at 10 N={10 * a.examples:,}", "growth",
                       "goal", "N: 1st / 2nd half peak", "10 N: 1st / 2nd half peak")))


if __name__ == "__main__":
    main()
