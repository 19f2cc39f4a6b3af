"""Dump scaling: K ranks under torchrun, one thread each, against one process with one thread (issue 8).

    python benchmarks/bench_scale.py [--examples 16384] [--ranks 2] [--sort-window 2048] [--repeats 1]

The real MiniLM-L6 teacher over the first N SST-2 train examples (max length 64). Each run is a fresh process
tree; the time is the dump's own loop as it records it in the store (`dump_seconds`: on rank 0, from the plan to
the complete flag, so it includes sharing out the work and gathering the checksums). The two stores must be equal
byte for byte. Scaling efficiency = (one-process time / K-rank time) / K; goal >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import GLUE, header, minilm_teacher, table


def dump_seconds(teacher: Path, out: Path, n: int, ranks: int, window: int) -> float:
    args = ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(GLUE / "SST-2"), "--out", str(out),
            "--split", "train", "--max-examples", str(n), "--max-seq-length", "64", "--sort-window", str(window),
            "--overwrite"]
    launcher = [sys.executable, "-m", "pkd_cache"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m",
         "pkd_cache"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"dump with {ranks} rank(s) failed:\n{p.stderr[-2000:]}")
    return json.loads((out / "zarr.json").read_text())["attributes"]["dump_seconds"]


def chunk_bytes(store: Path) -> dict[str, bytes]:
    """Every file but the root metadata (its times differ)."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*"))
            if f.is_file() and f.relative_to(store) != Path("zarr.json")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=16384)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sort-window", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = minilm_teacher(tmp / "teacher")
        one, many = [], []
        for _ in range(a.repeats):  # alternating, so drift on the machine hits both
            one.append(dump_seconds(teacher, tmp / "one.zarr", a.examples, 1, a.sort_window))
            many.append(dump_seconds(teacher, tmp / "many.zarr", a.examples, a.ranks, a.sort_window))
        same = chunk_bytes(tmp / "one.zarr") == chunk_bytes(tmp / "many.zarr")
    t1, tk = statistics.median(one), statistics.median(many)
    rows = [("1 process, 1 thread", a.examples, t1, a.examples / t1, "", ""),
            (f"{a.ranks} ranks, 1 thread each", a.examples, tk, a.examples / tk, (t1 / tk) / a.ranks, ">= 0.9")]
    print(table(rows, ("dump", "examples", "seconds", "ex/s", "scaling efficiency", "goal")))
    print(f"stores equal byte for byte: {same}")


if __name__ == "__main__":
    main()
