"""Whether two versions of pkd-cache write the same bytes: dump the same examples with the same saved teacher in
float16 and int8, Zarr and Arrow, and print each store's chunk count, chunk bytes and the sha256 of its checksum
manifest (every chunk file's size and CRC-32C). Run it once per tree and compare the tables:

    python benchmarks/store_digests.py --teacher /tmp/teacher --out /tmp/after
    PYTHONPATH=/path/to/old/tree python benchmarks/store_digests.py --teacher /tmp/teacher --out /tmp/before

(`--teacher`: a saved task model, e.g. `common.minilm_teacher(Path("/tmp/teacher"))`.) Equal digests mean every
chunk file is byte for byte the same, so anything trained from the stores (B7's accuracy half) is unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from common import GLUE, table

import pkd_cache


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--examples", type=int, default=2048)
    a = p.parse_args()
    print(f"# pkd_cache from {Path(pkd_cache.__file__).parent}")
    rows = []
    for dtype in ("float16", "int8"):
        for fmt in ("zarr", "arrow"):
            out = a.out / f"{dtype}.{fmt}"
            pkd_cache.dump(pkd_cache.DumpConfig(teacher=a.teacher, task="sst2", data_dir=str(GLUE / "SST-2"),
                                                out=str(out), max_seq_length=64, batch_size=32, chunk_size=512,
                                                max_examples=a.examples, dtype=dtype, format=fmt, overwrite=True))
            chunks = json.loads((out / "checksums.json").read_text())["chunks"]
            digest = hashlib.sha256(json.dumps(chunks, sort_keys=True).encode()).hexdigest()[:16]
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "json" not in f.name)
            rows.append((f"{dtype} {fmt}", len(chunks), f"{size:,}", digest))
    print(table(rows, ("store", "chunk files", "chunk bytes", "manifest sha256")))


if __name__ == "__main__":
    main()
