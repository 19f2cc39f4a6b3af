"""Kill and resume, many times: SIGKILL a real `pkd-cache dump` at a random moment, resume it, compare every file.

    python benchmarks/bench_resume.py [--runs 20] [--examples 3000] [--chunk-size 64] [--seed 0]

A tiny random teacher (the tests' fixtures) and a synthetic SST-2-like task keep each run to seconds. Each run is
killed once a random number of chunks are durable, plus a random delay, then resumed with `--resume`; the store
must equal an uninterrupted dump file for file and byte for byte (root metadata aside: times, resumptions). The
table says how many runs matched and how much teacher work the resumes did: a resume runs the teacher on exactly
the chunks that were not durable; of those, at most the ones in flight when the process died (the chunk being
computed and the writer's queue of 2) had been computed before.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, table

from pkd_cache.testing import make_bert, write_sst2  # the tests' tiny teacher and data


def files(store: Path) -> dict[str, bytes]:
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*"))
            if f.is_file() and f.relative_to(store) != Path("zarr.json")}


def dump(args: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pkd_cache", "dump", *args, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                                    "PATH": "/usr/bin:/bin"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(header())
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher, data = make_bert(tmp / "teacher", layers=4, head=True), write_sst2(tmp / "SST-2", a.examples, 200)

        def args(out: Path) -> list[str]:
            return ["--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out),
                    "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", str(a.chunk_size)]

        ref = tmp / "ref.zarr"
        assert dump(args(ref)).wait() == 0
        reference = files(ref)
        chunks = -(-a.examples // a.chunk_size) + -(-200 // a.chunk_size)
        identical, durable_at_kill, computed, kept = 0, [], [], []
        for i in range(a.runs):
            out = tmp / f"run{i}.zarr"
            proc = dump(args(out))
            target = rng.randint(1, chunks // 2)
            progress = out / ".pkd_cache" / "progress"
            while proc.poll() is None and sum(1 for _ in progress.rglob("*.json")) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.2))
            if proc.poll() is not None:  # it finished before the kill: not a kill-and-resume run
                print(f"run {i + 1}: the dump finished before the kill; skipped", flush=True)
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if json.loads((out / "zarr.json").read_text())["attributes"].get("complete"):
                print(f"run {i + 1}: the dump completed its store before the kill landed; skipped", flush=True)
                continue
            durable = sum(1 for _ in progress.rglob("*.json"))
            resumed = dump(args(out), "--resume")
            _, err = resumed.communicate()
            meta = json.loads((out / "zarr.json").read_text())["attributes"]
            last = (meta.get("resumptions") or [{"kept_examples": 0, "computed_examples": 0}])[-1]
            got = files(out)
            same = resumed.returncode == 0 and meta["complete"] and got == reference
            if not same:
                diff = sorted(set(got) ^ set(reference)) + [k for k in got if k in reference and got[k] != reference[k]]
                print(f"run {i + 1}: MISMATCH exit {resumed.returncode}; differing files {diff[:5]}; "
                      f"{err.strip().splitlines()[-1:] if err.strip() else ''}", flush=True)
            identical += same
            durable_at_kill.append(durable)
            computed.append(last["computed_examples"])
            kept.append(last["kept_examples"])
            print(f"run {i + 1}: killed with {durable}/{chunks} chunks durable; resume kept {last['kept_examples']:,} "
                  f"examples, ran the teacher on {last['computed_examples']:,}; identical: {same}", flush=True)
    runs = len(durable_at_kill)  # the kills that landed while the dump was running
    rows = [(f"{runs} runs, {a.examples + 200:,} examples in {chunks} chunks", f"{identical}/{runs} identical",
             f"{sum(durable_at_kill) / runs:.1f}", f"{sum(kept) / runs:,.0f}", f"{sum(computed) / runs:,.0f}",
             f"<= {3 * a.chunk_size}")]
    print()
    print(table(rows, ("kill and resume", "result", "mean chunks durable at kill", "mean examples kept",
                       "mean examples the resume ran", "of those computed before the kill")))


if __name__ == "__main__":
    main()
