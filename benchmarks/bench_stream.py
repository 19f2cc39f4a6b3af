"""B3: shuffled `store.batches()` read rate on a bert-base-shaped store, next to a plain memcpy of the same bytes.

    python benchmarks/bench_stream.py [--examples 200000] [--batch-size 32] [--store DIR]

The store has bert-base's shape (13 x 768 float16 CLS per example, max length 128) filled with random values,
which compress worse than real activations: a pessimistic case for decompression. Goal: >= 100k examples/s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import header, table

import pkd_cache
from pkd_cache.store.writer import StoreWriter

LAYERS, HIDDEN, SEQ, CHUNK = 12, 768, 128, 1024


def make_store(path: Path, n: int) -> None:
    meta = {"teacher": {"num_layers": LAYERS, "hidden_size": HIDDEN}, "task": {"name": "sst2"}}
    w = StoreWriter(str(path), True, meta)
    w.create_split("train", n, SEQ, 2, LAYERS, HIDDEN, "float16", "int64", CHUNK, {})
    rng = np.random.default_rng(0)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        lengths = rng.integers(8, SEQ, m)
        mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.uint8)
        w.write("train", s, {"input_ids": (rng.integers(1000, 30000, (m, SEQ)) * mask).astype(np.int32),
                             "attention_mask": mask, "token_type_ids": np.zeros((m, SEQ), np.uint8),
                             "labels": rng.integers(0, 2, m), "logits": rng.standard_normal((m, 2), np.float32),
                             "cls": rng.standard_normal((m, LAYERS + 1, HIDDEN), np.float32).astype(np.float16)})
    w.finish()


def memcpy_rate(n: int, bytes_per_example: int) -> float:
    block = np.ones(256 * 2**20, np.uint8)
    dst = np.empty_like(block)
    total, copies = n * bytes_per_example, 0
    t0 = time.perf_counter()
    while copies * block.nbytes < total:
        np.copyto(dst, block)
        copies += 1
    return n / (time.perf_counter() - t0) * (copies * block.nbytes / total)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--store", help="reuse (or create) the store here instead of a temporary folder")
    a = p.parse_args()
    print(header())
    with tempfile.TemporaryDirectory() as d:
        path = Path(a.store) if a.store else Path(d) / "stream.zarr"
        if not (path / "zarr.json").is_file():
            make_store(path, a.examples)
        store = pkd_cache.open_store(str(path))
        n = store.num_examples("train")
        bytes_per_example = SEQ * 6 + 8 + 8 + (LAYERS + 1) * HIDDEN * 2
        rows = []
        for name, kw in (("all fields, all 13 layers", {}),
                         ("PKD 12->6 (5 mapped layers)", {"layers": [2, 4, 6, 8, 10]})):
            t0 = time.perf_counter()
            seen = sum(len(b["labels"]) for b in store.batches("train", a.batch_size, shuffle=True, seed=0, **kw))
            rows.append((f"B3 shuffled read, {name}", n, seen / (time.perf_counter() - t0)))
        rows.append(("memcpy of the same bytes", n, memcpy_rate(n, bytes_per_example)))
    print(table(rows, ("measure", "examples", "examples/s")))
    print(f"\nuncompressed bytes per example: {bytes_per_example:,}; goal for B3: >= 100,000 examples/s")


if __name__ == "__main__":
    main()
