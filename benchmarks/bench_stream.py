"""B3: shuffled `store.batches()` read rate on a bert-base-shaped store, next to a plain memcpy of the same bytes.

    python benchmarks/bench_stream.py [--examples 200000] [--batch-size 32] [--repeats 3] [--store DIR]

The store has bert-base's shape (13 x 768 float16 CLS per example, max length 128) filled with random values,
which compress worse than real activations: a pessimistic case for decompression. Goal: >= 100k examples/s.
Side by side in one run: pkd-cache's reader (chunk files decoded in place, each checked against its checksum and
its values checked), the same reader without the value checks and without either check (what the checks cost),
and a store whose CLS chunks hold all 13 layers (the first 0.1.0 layout). Each figure
is the median of `--repeats` passes over the whole store after one warm-up pass (files in the page cache).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
from common import header, table

import pkd_cache
from pkd_cache.store import backend as backend_module
from pkd_cache.store import integrity
from pkd_cache.store.format import split_arrays
from pkd_cache.store.writer import open_writer

LAYERS, HIDDEN, SEQ, CHUNK = 12, 768, 128, 1024
PKD_SKIP = [2, 4, 6, 8, 10]


def make_store(path: Path, n: int, whole_layers: bool = False) -> None:
    meta = {"teacher": {"num_layers": LAYERS, "hidden_size": HIDDEN},
            "task": {"name": "sst2", "num_labels": 2, "is_regression": False, "label_names": ["negative", "positive"]},
            "tokenizer": {"vocab_size": 30522}, "max_seq_length": SEQ, "cls_dtype": "float16"}
    w = open_writer(str(path), True, {**meta, "chunk_size": CHUNK})
    w.create_split("train", split_arrays(n, SEQ, 2, LAYERS, HIDDEN, "float16", "int64"), {})
    if whole_layers:  # the first 0.1.0 layout: one CLS chunk holds all L+1 layers
        from pkd_cache.store.chunks import blosc_params
        from pkd_cache.store.format import compressor

        g = w.root["train"]
        del g["cls"]
        cls = g.create_array("cls", shape=(n, LAYERS + 1, HIDDEN), chunks=(CHUNK, LAYERS + 1, HIDDEN),
                             dtype="float16", fill_value=0, compressors=compressor("cls", 2))
        w._arrays["train", "cls"] = (cls, blosc_params(cls))
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


@contextmanager
def unchecked(crc: bool):
    """The reader without the value checks (store/trust.py), and with `crc` also without the checksum checks: the
    same reads, to price the checks side by side."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(backend_module, "value_problem", lambda *a: None))
        if crc:
            stack.enter_context(mock.patch.object(integrity, "check_recorded", lambda *a: None))
        yield


def read_rate(path: Path, batch_size: int, repeats: int, reopen: bool = True, **kw) -> float:
    """Median examples/s of full shuffled passes (a new epoch each), after a warm-up pass (files in the page cache).

    `reopen`: each pass opens the store anew, so it pays the open-time checks and every chunk's value check, as a
    first epoch does; otherwise one store serves every pass and a chunk's values, once checked, are not checked
    again (later epochs)."""
    store = pkd_cache.open_store(str(path))
    rates = []
    for epoch in range(repeats + 1):
        t0 = time.perf_counter()
        if reopen:
            store = pkd_cache.open_store(str(path))
        seen = sum(len(b["labels"]) for b in store.batches("train", batch_size, seed=0, epoch=epoch, **kw))
        rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def one_pass(path: Path, batch_size: int, epoch: int, **kw) -> float:
    """Examples/s of one shuffled pass of a freshly opened store: a first epoch, every check paid."""
    t0 = time.perf_counter()
    store = pkd_cache.open_store(str(path))
    seen = sum(len(b["labels"]) for b in store.batches("train", batch_size, seed=0, epoch=epoch, **kw))
    return seen / (time.perf_counter() - t0)


def check_overhead(path: Path, batch_size: int, pairs: int, **kw) -> tuple[float, float, float]:
    """(checked, unchecked, median of the per-pair ratios - 1): first-epoch passes with and without the value
    checks, alternating, so that drift on a noisy machine hits both sides alike. One warm-up pass first."""
    one_pass(path, batch_size, 0, **kw)
    checked, bare, ratios = [], [], []
    for i in range(pairs):
        c = one_pass(path, batch_size, 1 + i, **kw)
        with unchecked(crc=False):
            u = one_pass(path, batch_size, 1 + i, **kw)
        checked.append(c), bare.append(u), ratios.append(u / c)
    return statistics.median(checked), statistics.median(bare), statistics.median(ratios) - 1


@contextmanager
def timed(module, name: str, spent: list):
    """`module.name` wrapped so that the CPU time its calls take, in whichever thread, adds up in spent[0]."""
    import threading

    inner, lock = getattr(module, name), threading.Lock()

    def wrapper(*a):
        t0 = time.thread_time()
        try:
            return inner(*a)
        finally:
            with lock:
                spent[0] += time.thread_time() - t0

    with mock.patch.object(module, name, wrapper):
        yield


def check_cpu_shares(path: Path, batch_size: int, passes: int, **kw) -> dict[str, tuple[float, float]]:
    """{value check: (median share of a first-epoch pass's CPU in the value checks, in the CRC checks)}, for the
    compiled value check and the numpy one (store/trust.py), alternating pass by pass. CPU shares, not wall
    ratios: the wall ratio of two ~2 s passes moves by more than the checks cost on this VM (RESULTS.md)."""
    from pkd_cache.store import trust

    kinds = {"compiled (store/_bits.c)": trust._one_pass, "numpy (two max passes)": None}
    if trust._one_pass is None:
        del kinds["compiled (store/_bits.c)"]
    shares = {k: ([], []) for k in kinds}
    one_pass(path, batch_size, 0, **kw)
    for i in range(passes):
        for kind, fn in kinds.items():
            values, crc = [0.0], [0.0]
            with mock.patch.object(trust, "_one_pass", fn), timed(backend_module, "value_problem", values), \
                    timed(integrity, "check_recorded", crc):
                c0 = time.process_time()
                one_pass(path, batch_size, 1 + i, **kw)
                cpu = time.process_time() - c0
            shares[kind][0].append(values[0] / cpu), shares[kind][1].append(crc[0] / cpu)
    return {k: (statistics.median(v), statistics.median(c)) for k, (v, c) in shares.items()}


def stored(path: Path, n: int, whole_layers: bool) -> Path:
    if not (path / "zarr.json").is_file():
        make_store(path, n, whole_layers)
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--store", help="keep the stores in this folder (reused when there) instead of a temporary one")
    p.add_argument("--overhead", type=int, default=0, metavar="PAIRS",
                   help="only price the value checks: PAIRS alternating first-epoch passes with and without them")
    a = p.parse_args()
    print(header())
    if a.overhead:
        folder = Path(a.store or tempfile.mkdtemp())
        path = stored(folder / "per_layer.zarr", a.examples, False)
        rows = []
        for what, kw in (("all fields, all 13 layers", {}), ("PKD-skip 12->6, layers 2,4,6,8,10", {"layers": PKD_SKIP})):
            c, u, cost = check_overhead(path, a.batch_size, a.overhead, **kw)
            rows.append((f"B3 value checks, first epoch, {what}", a.overhead, f"{c:,.0f}", f"{u:,.0f}", f"{cost:.1%}"))
        print(table(rows, ("measure", "pairs", "checked ex/s (median)", "unchecked ex/s (median)",
                           "cost (median of pair ratios)")))
        rows = []
        for what, kw in (("all fields, all 13 layers", {}), ("PKD-skip 12->6, layers 2,4,6,8,10", {"layers": PKD_SKIP})):
            for kind, (values, crc) in check_cpu_shares(path, a.batch_size, a.overhead, **kw).items():
                rows.append((f"B3 first epoch, {what}", kind, a.overhead, f"{values:.1%}", f"{crc:.1%}"))
        print(table(rows, ("measure", "value check", "passes each", "CPU in value checks (median)",
                           "CPU in CRC checks (median)")))
        return
    with tempfile.TemporaryDirectory() as d:
        folder = Path(a.store or d)
        per_layer = stored(folder / "per_layer.zarr", a.examples, False)
        whole = stored(folder / "whole_layers.zarr", a.examples, True)
        n = pkd_cache.open_store(str(per_layer)).num_examples("train")
        rows = []
        for what, kw in (("all fields, all 13 layers", {}), ("PKD-skip 12->6, layers 2,4,6,8,10", {"layers": PKD_SKIP})):
            rows.append((f"B3 pkd-cache reader, {what}", "per layer", n, read_rate(per_layer, a.batch_size, a.repeats, **kw)))
            rows.append((f"  the same, later epochs of one open store, {what}", "per layer", n,
                         read_rate(per_layer, a.batch_size, a.repeats, reopen=False, **kw)))
            with unchecked(crc=False):
                rows.append((f"  the same without the value checks, {what}", "per layer", n,
                             read_rate(per_layer, a.batch_size, a.repeats, **kw)))
            with unchecked(crc=True):
                rows.append((f"  the same without value or checksum checks, {what}", "per layer", n,
                             read_rate(per_layer, a.batch_size, a.repeats, **kw)))
            rows.append((f"pkd-cache reader, {what}", "all layers", n, read_rate(whole, a.batch_size, a.repeats, **kw)))
        bytes_per_example = SEQ * 6 + 8 + 8 + (LAYERS + 1) * HIDDEN * 2
        rows.append(("memcpy of the same bytes (all layers)", "", n, memcpy_rate(n, bytes_per_example)))
    print(table(rows, ("measure", "cls chunks", "examples", "examples/s")))
    print(f"\nuncompressed bytes per example: {bytes_per_example:,}; goal for B3: >= 100,000 examples/s")


if __name__ == "__main__":
    main()
