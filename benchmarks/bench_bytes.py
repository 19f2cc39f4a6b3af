"""B7 (size half): bytes per example on disk of float16 and int8 CLS stores.

    python benchmarks/bench_bytes.py [--examples 4096]

Dumps the first N SST-2 train examples with the real MiniLM-L6 (7 x 384 CLS) in both dtypes and reports the bytes
per example on disk (all arrays, and the CLS arrays alone), plus the uncompressed size of a bert-base-shaped
example (13 x 768) in each dtype. Goal: int8 <= 11 KB per bert-base example. The accuracy half of B7 (a 3-layer
student from each store) is a pair of `pkd-cache distill` runs, recorded in RESULTS.md when run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import GLUE, header, table, teacher_workspace

import pkd_cache


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=4096)
    a = p.parse_args()
    print(header())
    rows = []
    with teacher_workspace() as (tmp, teacher):
        for dtype in ("float16", "int8"):
            out = tmp / f"{dtype}.zarr"
            pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(GLUE / "SST-2"),
                                                out=str(out), splits=["train"], max_examples=a.examples,
                                                max_seq_length=128, dtype=dtype))
            cls = disk_bytes(out / "train" / "cls") + (disk_bytes(out / "train" / "cls_scale")
                                                       if (out / "train" / "cls_scale").exists() else 0)
            seq_bytes = 128 * 6 + 8 + 8  # tokens, label, logits, uncompressed
            raw = 13 * 768 * (2 if dtype == "float16" else 1) + (13 * 4 if dtype == "int8" else 0) + seq_bytes
            rows.append((dtype, disk_bytes(out / "train") / a.examples, cls / a.examples, raw))
    print(table(rows, ("cls dtype", "MiniLM store bytes/example (disk)", "of which CLS",
                       "bert-base shape bytes/example (uncompressed)")))
    print("\ngoal for B7: int8 <= 11 KB (11,264 bytes) per bert-base example")


if __name__ == "__main__":
    main()
