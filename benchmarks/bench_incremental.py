"""Team cache: what a dump of data grown by 5% costs against a full dump (incremental reuse of cached rows).

    python benchmarks/bench_incremental.py [--examples 8192] [--growth 0.05] [--teacher minilm|bert-base]

The real MiniLM-L6 teacher (2-label head), or a random bert-base-shaped one, on SST-2 train: a full dump of the first N examples (plus dev) into a
folder cache, then a dump of those N plus the next growth*N examples, shuffled among them (plus the same dev), into
the same cache: it reuses the cached rows and runs the teacher on the new ones only. Both are timed whole, as a user
waits for them (`pkd_cache.dump`, model loading included), and by the dump's own loop (`dump_seconds`); a fresh
dump of the grown data is timed as the reference. Goal (issue 16): the grown dump costs at most 10% of a full one.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench_cache import bert_base_teacher
from common import GLUE, header, minilm_teacher, table

import pkd_cache


def write_split(folder: Path, train_rows: list[str], header_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join([header_line] + train_rows) + "\n")
    (folder / "dev.tsv").write_text((GLUE / "SST-2" / "dev.tsv").read_text())
    return folder


def timed_dump(teacher: Path, data: Path, **kw):
    t0 = time.perf_counter()
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(data),
                                                max_seq_length=64, batch_size=64, **kw))
    return time.perf_counter() - t0, store.info()["dump_seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--growth", type=float, default=0.05)
    p.add_argument("--teacher", choices=("minilm", "bert-base"), default="minilm",
                   help="The real MiniLM-L6, or a random bert-base-shaped teacher (12 x 768: its cost per example, "
                        "which is what the ratio depends on).")
    a = p.parse_args()
    print(header())
    lines = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()
    base = lines[1:1 + a.examples]
    extra = lines[1 + a.examples:1 + a.examples + int(a.examples * a.growth)]
    grown = base + extra
    random.Random(0).shuffle(grown)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = minilm_teacher(tmp / "teacher") if a.teacher == "minilm" else bert_base_teacher(tmp / "teacher")
        old, new = write_split(tmp / "old" / "SST-2", base, lines[0]), write_split(tmp / "new" / "SST-2", grown, lines[0])
        full = timed_dump(teacher, old, cache=str(tmp / "cache"))
        incremental = timed_dump(teacher, new, cache=str(tmp / "cache"))
        fresh = timed_dump(teacher, new, out=str(tmp / "fresh.zarr"))
    rows = [(f"full dump, {len(base):,} train + dev, {a.teacher}", *full, 1.0),
            (f"grown by {len(extra):,} ({a.growth:.0%}): incremental dump into the same cache", *incremental,
             incremental[0] / full[0]),
            ("grown: fresh dump (reference)", *fresh, fresh[0] / full[0])]
    print(table([(r[0], f"{r[1]:.1f}", f"{r[2]:.1f}", f"{r[3]:.3f}") for r in rows],
                ("dump", "wall s (model load included)", "dump loop s", "wall / full dump")))
    print(f"\ngoal (issue 16): the grown dump costs at most 10% of a full dump; here "
          f"{incremental[0] / full[0]:.1%} of the wall time, {incremental[1] / full[1]:.1%} of the loop")


if __name__ == "__main__":
    main()
