"""Students per pass: K students trained together on each batch read from the store, against K separate runs.

    python benchmarks/bench_sweep.py [--students 4] [--steps 30] [--examples 4096] [--layers 3]

The store holds real MiniLM-L6 outputs for SST-2 (bucketed dump, float16 CLS). Each student is the first
`--layers` layers of MiniLM (PKD-skip), with different alpha/temperature per student; every run trains `--steps`
steps of batch 32. Side by side in one run: K separate `distill` runs (each reads and decompresses the store) and
one `distill_many` pass (reads once). The saving is the store's share of a step, so it is largest for small
students and fast accelerators; on this CPU the students' own compute dominates.
"""
from __future__ import annotations

import argparse
import time

from common import GLUE, header, minilm, table, teacher_workspace

import pkd_cache


def configs(store: str, out, k: int, steps: int, layers: int, tag: str) -> list:
    return [pkd_cache.DistillConfig(store=store, output_dir=str(out / f"{tag}{i}"), student_layers=layers,
                                    student_init=minilm(), alpha=(0.2, 0.5, 0.7, 0.9)[i % 4],
                                    temperature=(5.0, 10.0, 20.0)[i % 3], overwrite=True,
                                    train=pkd_cache.TrainConfig(max_steps=steps, batch_size=32, logging_steps=0))
            for i in range(k)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--students", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    a = p.parse_args()
    print(header())
    with teacher_workspace() as (tmp, teacher):
        store = str(tmp / "s.zarr")
        pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(GLUE / "SST-2"), out=store,
                                            max_seq_length=64, max_examples=a.examples))
        pkd_cache.distill(configs(store, tmp, 1, 5, a.layers, "warm")[0])  # warm-up: caches, allocator
        t0 = time.perf_counter()
        for c in configs(store, tmp, a.students, a.steps, a.layers, "alone"):
            pkd_cache.distill(c)
        separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        pkd_cache.distill_many(configs(store, tmp, a.students, a.steps, a.layers, "pass"))
        together = time.perf_counter() - t0
    rows = [(f"{a.students} students x {a.steps} steps, {a.layers}-layer MiniLM", separate, together,
             separate / together)]
    print(table(rows, ("measure", f"{a.students} separate runs s", "one pass s", "speed-up")))
    print("\nTimes include each run's model building and its dev evaluation (872 examples).")


if __name__ == "__main__":
    main()
