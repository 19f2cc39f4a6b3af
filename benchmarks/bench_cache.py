"""Team cache: the time from `pkd-cache dump` to a cache hit, for a bert-base-sized teacher.

    python benchmarks/bench_cache.py [--repeats 5] [--examples 512]

Saves a random bert-base-shaped BertForSequenceClassification (12 layers, hidden 768, 110M parameters: a 438 MB
model.safetensors) with the real MiniLM tokenizer, dumps the first N SST-2 train and dev examples into a folder
cache once (not timed; a hit reads the whole data files either way), then times the same `pkd-cache dump --cache DIR` as a fresh process until it exits with
its cache hit, next to `python -c pass` and `pkd-cache --help`. A hit hashes the teacher's files and reads the
task's data to compute the key; it loads no model and imports no torch (tests/test_team_cache.py checks that).
Goal (issue 16): a hit within 3 s on the development VM.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import GLUE, header, table

from pkd_cache.testing import minilm_path


def bert_base_teacher(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), num_labels=2))  # bert-base's shape
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def timed(cmd: list[str], env: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return statistics.median(times)


def full_data_key_seconds() -> float:
    """What the data part of a key costs for the whole task (the hit above may use --examples): load + fingerprint."""
    from pkd_cache.data.loading import load_examples
    from pkd_cache.data.tasks import get_task

    task = get_task("sst2")
    t0 = time.perf_counter()
    for split in ("train", "validation"):
        load_examples(task, split, str(GLUE / "SST-2")).fingerprint()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--examples", type=int, default=512, help="Examples per split the cached store holds (the miss "
                                                             "that fills the cache runs a bert-base on CPU).")
    a = p.parse_args()
    print(header())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PKD_CACHE_DEBUG": ""}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = bert_base_teacher(tmp / "bert-base-sst2")
        weights = sum(f.stat().st_size for f in teacher.glob("*.safetensors"))
        dump = [sys.executable, "-m", "pkd_cache", "dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir",
                str(GLUE / "SST-2"), "--cache", str(tmp / "cache"), "--max-seq-length", "64",
                "--max-examples", str(a.examples)]
        first = subprocess.run(dump, env=env, capture_output=True, text=True)  # the miss that fills the cache
        if first.returncode != 0:
            raise SystemExit(first.stderr[-3000:])
        hit = subprocess.run(dump, env=env, capture_output=True, text=True)
        assert "cache hit:" in hit.stderr, hit.stderr
        rows = [("python -c pass", timed([sys.executable, "-c", "pass"], env, a.repeats)),
                ("pkd-cache --help", timed([sys.executable, "-m", "pkd_cache", "--help"], env, a.repeats)),
                (f"pkd-cache dump, cache hit ({weights / 1e6:,.0f} MB of weights hashed)",
                 timed(dump, env, a.repeats))]
        shutil.rmtree(tmp / "cache")
    rows.append(("(in process) reading and fingerprinting all of SST-2 train + dev", full_data_key_seconds()))
    print(table([(name, f"{t:.2f}") for name, t in rows], ("command", f"median of {a.repeats} (s)")))
    print("\ngoal (issue 16): a cache hit within 3 s")


if __name__ == "__main__":
    main()
