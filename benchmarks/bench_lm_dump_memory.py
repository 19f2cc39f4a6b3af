"""Peak memory of `dump --task lm` with the LM head split into blocks of positions (teacher/lm_head.py) against the
whole forward, which holds a batch's logits [B, W, V] at once: side by side, alternating, each a fresh process.

    python benchmarks/bench_lm_dump_memory.py --teacher /work/lm/teacher --data /work/lm/data [--vocab 50257]
        [--shape 2x256] [--seq 1024] [--batch 16] [--documents 3000] [--logits sample:64] [--repeats 2]

The teacher is a GPT-2 of `--shape` (LAYERSxWIDTH) with random weights and a `--vocab`-id head (GPT-2's 50,257 by
default), fed `--teacher`'s tokenizer: memory and speed do not depend on the weights, and the ids the tokenizer
makes are all below the head's size. Each run is a child process; its peak RSS is the kernel's (wait4 rusage), its
speed the store's `dump_seconds`. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_lm_store import random_teacher
from common import header, peak_rss_mib, table

import pkd_cache

CHILD = """
import json, sys
import pkd_cache
from pkd_cache.commands import dump_lm
from pkd_cache.models import quiet_transformers
quiet_transformers()
settings, way = json.loads(sys.argv[1]), sys.argv[2]
if way == "whole forward":
    dump_lm.split_head = lambda *a: None
pkd_cache.dump(pkd_cache.DumpConfig(**settings))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", type=Path, required=True, help="its tokenizer and config are the random teacher's")
    p.add_argument("--data", type=Path, required=True, help="a folder with train.txt")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--shape", default="2x256")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--documents", type=int, default=3000)
    p.add_argument("--logits", default="sample:64")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = tmp / "train.txt"
        train.write_text("\n".join((a.data / "train.txt").read_text().splitlines()[:a.documents]) + "\n")
        settings = dict(teacher=str(random_teacher(a.teacher, a.shape, tmp / "teacher", a.vocab, a.seq)), task="lm",
                        data_files=[str(train)], out=str(tmp / "store.zarr"), max_seq_length=a.seq,
                        batch_size=a.batch, logits=a.logits, overwrite=True)
        runs = {"whole forward": [], "split head": []}
        for r in range(a.repeats):
            for way, got in runs.items():
                peak, _, _ = peak_rss_mib([sys.executable, "-c", CHILD, json.dumps(settings), way])
                meta = pkd_cache.open_store(str(tmp / "store.zarr")).info()
                tokens = sum(s["num_tokens"] for s in meta["splits"].values())
                got.append((peak, tokens / meta["dump_seconds"]))
                print(f"repeat {r + 1}, {way}: peak RSS {peak:,.0f} MiB, {got[-1][1]:,.0f} tok/s", flush=True)
    logits_mib = a.batch * a.seq * a.vocab * 4 / 2 ** 20
    print(f"GPT-2 {a.shape}, vocabulary {a.vocab:,}, {tokens:,} tokens in sequences of {a.seq}, teacher batches of "
          f"{a.batch} ({logits_mib:,.0f} MiB of float32 logits a batch), {a.logits}")
    print(table([(way, ", ".join(f"{p:,.0f}" for p, _ in got), statistics.median(p for p, _ in got),
                  ", ".join(f"{s:,.0f}" for _, s in got)) for way, got in runs.items()],
                ("dump --task lm", "peak RSS MiB", "median", "tok/s")))


if __name__ == "__main__":
    main()
