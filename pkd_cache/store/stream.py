"""Store -> batches: the epoch's order as a pure function, and a reader that prefetches and decompresses ahead.

Order (MosaicML-streaming style, no IO): chunks are visited in a random order and examples are shuffled within
groups of `shuffle_chunks` chunks, seeded by (seed, epoch). Reading a whole chunk at a time keeps reads
sequential and decompression amortised; the group shuffle mixes examples across chunks.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from ..errors import PkdCacheError
from .format import LAYER_AXIS_ARRAYS, TOKEN_ARRAYS
from .quantize import dequantize_int8
from .worker import pool_threads, produce

if TYPE_CHECKING:
    import torch

    from .backend import ChunkSource


@dataclass(frozen=True)
class Group:
    chunks: tuple[int, ...]  # chunk ids, loaded together
    rows: np.ndarray  # global example indices, in the order they are yielded


def epoch_groups(num_examples: int, chunk_size: int, shuffle: bool, seed: int, epoch: int,
                 shuffle_chunks: int) -> list[Group]:
    """The epoch's reading plan; its rows, concatenated, are a permutation of range(num_examples)."""
    num_chunks = -(-num_examples // chunk_size)
    if not shuffle:
        return [Group((c,), np.arange(c * chunk_size, min((c + 1) * chunk_size, num_examples)))
                for c in range(num_chunks)]
    rng = np.random.default_rng([seed, epoch])
    chunks = rng.permutation(num_chunks)
    k = max(1, shuffle_chunks)
    groups = []
    for g in range(0, num_chunks, k):
        ids = tuple(int(c) for c in chunks[g:g + k])
        rows = np.concatenate([np.arange(c * chunk_size, min((c + 1) * chunk_size, num_examples)) for c in ids])
        groups.append(Group(ids, rows[rng.permutation(len(rows))]))
    return groups


def iter_batches(store, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 layers: Optional[Sequence[int]] = None, fields: Sequence[str] = (), shuffle_chunks: int = 8,
                 prefetch: int = 2, workers: Optional[int] = None, pin_memory: bool = False,
                 start_batch: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of torch tensors following `epoch_groups`; a thread loads the next group(s) meanwhile.

    Batches are consecutive slices of the groups' rows, so `start_batch` (a resumed run) skips exactly
    `start_batch * batch_size` rows: whole groups unread, then part of the next.

    `shard=(r, W)` (rank r of W): each batch is the r-th of W near-equal parts (`np.array_split`) of the batch one
    process would get, so the W ranks' batches together are exactly the one-process batch. A rank reads only the
    chunks holding its rows and gathers only those. A last batch smaller than W is left out on every rank.
    """
    n = store.num_examples(split)
    readers = {k: store.chunk_reader(split, k) for k in _stored_arrays(store, split, fields)}
    chunk = readers[next(iter(readers))].chunks[0]
    if any(r.chunks[0] != chunk for r in readers.values()):
        raise PkdCacheError(f"store {store.path}: the arrays of split {split!r} are chunked differently along N")
    groups = _skip_rows(epoch_groups(n, chunk, shuffle, seed, epoch, shuffle_chunks), start_batch * batch_size)
    sizes = batch_sizes(max(0, n - start_batch * batch_size), batch_size)
    if shard[1] > 1:
        groups, sizes = shard_rows(groups, sizes, *shard, chunk)
    buffers = BufferPool()
    pool = ThreadPoolExecutor(max_workers=pool_threads(workers or None), thread_name_prefix="pkd-cache-decode")
    try:
        # a thread reads `prefetch` groups ahead; its exception is raised here
        loaded = produce((_load_group(readers, g, chunk, layers, pool, buffers) for g in groups), prefetch,
                         "pkd-cache-reader")
        todo = iter(sizes)
        need = next(todo, None)
        carry: Optional[dict[str, np.ndarray]] = None
        for buf in loaded:
            if carry is not None:
                buf = {k: np.concatenate([carry[k], v]) for k, v in buf.items()}
            m, at = len(next(iter(buf.values()))), 0
            while need is not None and m - at >= need:
                yield to_batch({k: v[at:at + need] for k, v in buf.items()}, pin_memory)
                at += need
                need = next(todo, None)
            carry = {k: v[at:] for k, v in buf.items()} if at < m else None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def batch_sizes(num_examples: int, batch_size: int, world: int = 1) -> list[int]:
    """Rows of each batch of an epoch, as W ranks together take them (a last batch smaller than W is left out)."""
    return shard_sizes([min(batch_size, num_examples - i) for i in range(0, num_examples, batch_size)], world)


def shard_sizes(sizes: list[int], world: int) -> list[int]:
    """The one-process batch sizes that W ranks keep (a last batch smaller than W is left out)."""
    return [s for s in sizes if s >= world]


def shard_rows(groups: list[Group], sizes: list[int], rank: int, world: int,
               chunk: int) -> tuple[list[Group], list[int]]:
    """This rank's part of every batch: its groups (only the chunks it reads, only its rows) and batch sizes."""
    keep = np.zeros(sum(sizes), dtype=bool)
    local, at = [], 0
    for size in shard_sizes(sizes, world):
        part = np.array_split(np.arange(at, at + size), world)[rank]
        keep[part] = True
        local.append(len(part))
        at += size
    out, at = [], 0
    for g in groups:
        rows = g.rows[keep[at:at + len(g.rows)]]
        at += len(g.rows)
        if len(rows):
            used = set((rows // chunk).tolist())
            out.append(Group(tuple(c for c in g.chunks if c in used), rows))
    return out, local


def _skip_rows(groups: list[Group], skip: int) -> list[Group]:
    while groups and skip >= len(groups[0].rows):
        skip -= len(groups[0].rows)
        groups = groups[1:]
    if groups and skip:  # the group's chunks are still read; only its first `skip` rows are dropped
        groups = [Group(groups[0].chunks, groups[0].rows[skip:])] + groups[1:]
    return groups


def _stored_arrays(store, split: str, fields: Sequence[str]) -> list[str]:
    """The arrays to read for `fields`: int8 `cls` needs its `cls_scale` too."""
    names = list(fields)
    if "cls" in names and store.array(split, "cls").dtype == np.int8:
        names.append("cls_scale")
    return names


def _load_group(readers: dict[str, ChunkSource], group: Group, chunk: int, layers, pool,
                buffers: "BufferPool") -> dict[str, np.ndarray]:
    """The group's examples in yield order, gathered straight from decoded chunks (decoded in parallel)."""
    chunk_of_row, local = group.rows // chunk, group.rows % chunk
    where = {c: np.flatnonzero(chunk_of_row == c) for c in group.chunks}
    out, jobs = {}, []
    for name, reader in readers.items():
        picks = list(layers) if layers is not None and name in LAYER_AXIS_ARRAYS else None
        dest = buffers.get(_gathered_shape(reader, len(group.rows), picks), reader.dtype)
        out[name] = dest
        for c in group.chunks:
            for j, pairs in _axis1_chunks(reader, picks):
                coords = (c,) if len(reader.shape) == 1 else (c, j) + (0,) * (len(reader.shape) - 2)
                jobs.append(pool.submit(_gather_chunk, reader, coords, pairs, dest, where[c], local[where[c]]))
    for job in jobs:
        job.result()
    if "cls_scale" in out:  # int8 store: dequantised here, off the training thread
        out["cls"] = dequantize_int8(out["cls"], out.pop("cls_scale"))
    return out


def _gathered_shape(reader: ChunkSource, rows: int, picks) -> tuple[int, ...]:
    shape = (rows,) + reader.shape[1:]
    return shape if picks is None else shape[:1] + (len(picks),) + shape[2:]


def _axis1_chunks(reader: ChunkSource, picks) -> list[tuple[int, Optional[list[tuple[int, int]]]]]:
    """[(chunk index along axis 1, [(position in the output, index inside that chunk), ...] or None = all)]."""
    if len(reader.shape) < 2:
        return [(0, None)]
    if any(k != s for k, s in zip(reader.chunks[2:], reader.shape[2:])):
        raise PkdCacheError("an array is chunked along an axis other than N and layers")
    width = reader.chunks[1]
    if picks is None and width >= reader.shape[1]:
        return [(0, None)]
    picks = range(reader.shape[1]) if picks is None else picks
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for pos, index in enumerate(picks):
        by_chunk.setdefault(index // width, []).append((pos, index % width))
    return sorted(by_chunk.items())


def _gather_chunk(reader: ChunkSource, coords: tuple[int, ...], pairs, dest: np.ndarray, rows: np.ndarray,
                  local: np.ndarray) -> None:
    """Decode one chunk into this thread's buffer and copy its selected rows (and layers) into `dest[rows]`."""
    buf = reader.read_into(coords, _thread_buffer(reader))
    if pairs is None:
        dest[rows] = buf[local]
    else:
        for pos, index in pairs:
            dest[rows, pos] = buf[local, index]


class BufferPool:
    """Group-sized arrays recycled once nothing refers to them any more.

    A fresh 160 MB array per group costs a page fault per 4 KB on first touch, about a third of the read time
    (benchmarks/RESULTS.md, B3). Batches are views of these arrays, so an array is reused only when no view
    of it is alive: its reference count is down to the pool's own. A consumer that keeps every batch (a list
    of them, say) simply gets fresh arrays.
    """

    def __init__(self, per_shape: int = 4):
        self.per_shape = per_shape
        self.arrays: dict[tuple, list[np.ndarray]] = {}

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        pooled = self.arrays.setdefault((shape, np.dtype(dtype).str), [])
        for a in pooled:
            if sys.getrefcount(a) <= 3:  # the list, the loop variable and getrefcount's argument
                return a
        a = np.empty(shape, dtype)
        if len(pooled) < self.per_shape:
            pooled.append(a)
        return a


_buffers = threading.local()


def _thread_buffer(reader: ChunkSource) -> np.ndarray:
    """A decode buffer per thread and chunk shape, reused chunk after chunk: no fresh pages (faults) per read.

    A thread finishes with a buffer (the gather) before its next chunk, so arrays of one shape can share it.
    """
    cache = _buffers.__dict__.setdefault("cache", {})
    key = (reader.chunks, reader.dtype.str)
    if key not in cache:
        cache[key] = reader.buffer()
    return cache[key]


def to_batch(arrays: dict[str, np.ndarray], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Torch tensors (token ids as int64), cut to the batch's longest sequence; pinned for fast GPU copies."""
    import torch  # here, not at the top: `pkd-cache info` and `verify` read stores without torch (seconds)

    batch = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        batch[k] = t.long() if k in TOKEN_ARRAYS else t
    batch = trim_padding(batch)
    return {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut the token columns of a batch to its longest sequence (dynamic padding)."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :width] if k in TOKEN_ARRAYS else v) for k, v in batch.items()}
