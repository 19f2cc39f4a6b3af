"""B1 and B2: dump throughput against a bare teacher forward, and length bucketing against fixed padding.

    python benchmarks/bench_dump.py [--examples 8192] [--b2-examples 67349] [--repeats 3] [--device cpu|cuda]
        [--precision bf16]

B1: dump's loop (tokenise, forward, compress, write; model loading excluded) vs a bare forward over the same
    bucketed batches of the same examples, tokenised beforehand; goal >= 0.97.
B2: `--pad-to-max-length` dump time / bucketed dump time on SST-2 train with the real MiniLM-L6; goal >= 4x.

PKD_GLUE=DIR reads SST-2 from DIR/SST-2 instead of ../shared/glue; PKD_MINILM_CONFIG=DIR (MiniLM's config.json and
tokenizer files) runs a MiniLM with random weights instead of the installed one: the same speed (common.py).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import GLUE, header, minilm_teacher, synchronize, table

import pkd_cache
from pkd_cache.data.loading import load_examples
from pkd_cache.data.tasks import get_task
from pkd_cache.data.tokenize import tokenize
from pkd_cache.commands.dump_shares import sort_windows
from pkd_cache.teacher.run import run_chunk


def dump_seconds(teacher: Path, out: Path, n: int, **kw) -> float:
    """Seconds of dump's own loop (tokenise, forward, compress, write), as it records them in the store."""
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), task="sst2", data_dir=str(GLUE / "SST-2"),
                                                out=str(out), splits=["train"], max_examples=n, max_seq_length=64,
                                                overwrite=True, **kw))
    return store.info()["dump_seconds"]


def bare_forward_seconds(teacher: Path, n: int, batch: int, device, precision: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(teacher).to(device).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    ex = load_examples(get_task("sst2"), "train", str(GLUE / "SST-2"), n)
    defaults = pkd_cache.DumpConfig(teacher="", task="sst2", out="")
    windows = [tokenize(tok, ex, s, e, 64) for s, e in sort_windows(n, defaults.chunk_size, defaults.sort_window)]
    synchronize(device)
    t0 = time.perf_counter()
    for tokens in windows:  # the same bucketed batches as dump, outputs brought to the host as dump needs them
        run_chunk(model, tokens, batch, bucketed=True, cls_dtype=np.float16, device=device, precision=precision)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--b2-examples", type=int, default=67349)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="B1: alternating bare/dump pairs; medians")
    a = p.parse_args()
    device = torch.device(a.device)
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = minilm_teacher(tmp / "teacher")
        kw = dict(batch_size=a.batch_size, device=a.device, precision=a.precision)
        dump_seconds(teacher, tmp / "warm.zarr", 512, **kw)  # warm-up: caches, allocator
        bares, wholes = [], []
        for _ in range(a.repeats):  # alternating: this VM's speed drifts by 20% within minutes
            bares.append(bare_forward_seconds(teacher, a.examples, a.batch_size, device, a.precision))
            wholes.append(dump_seconds(teacher, tmp / "b1.zarr", a.examples, **kw))
        bare, whole = statistics.median(bares), statistics.median(wholes)
        rows = [("B1 dump / bare forward", a.examples, a.examples / bare, a.examples / whole, bare / whole, ">= 0.97")]
        if a.b2_examples > 0:
            bucketed = dump_seconds(teacher, tmp / "b2b.zarr", a.b2_examples, **kw)
            padded = dump_seconds(teacher, tmp / "b2p.zarr", a.b2_examples, pad_to_max_length=True, **kw)
            rows.append(("B2 padded / bucketed dump time", a.b2_examples, a.b2_examples / padded,
                         a.b2_examples / bucketed, padded / bucketed, ">= 4"))
    print(table(rows, ("measure", "examples", "reference ex/s", "pkd-cache ex/s", "ratio", "goal")))


if __name__ == "__main__":
    main()
