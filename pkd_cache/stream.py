"""Store -> batches: the epoch's order as a pure function, and a reader that prefetches and decompresses ahead.

Order (MosaicML-streaming style, no IO): chunks are visited in a random order and examples are shuffled within
groups of `shuffle_chunks` chunks, seeded by (seed, epoch). Reading a whole chunk at a time keeps reads
sequential and decompression amortised; the group shuffle mixes examples across chunks.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .data.tokenize import trim_padding
from .store.format import TOKEN_ARRAYS


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
                 prefetch: int = 1, workers: int = 4, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of torch tensors following `epoch_groups`; a thread loads the next group(s) meanwhile."""
    n = store.num_examples(split)
    chunk = store.array(split, "labels").chunks[0]
    groups = epoch_groups(n, chunk, shuffle, seed, epoch, shuffle_chunks)
    loaded = _prefetch((_load_group(store, split, g, chunk, n, layers, fields, workers) for g in groups), prefetch)
    carry: Optional[dict[str, np.ndarray]] = None
    for i, buf in enumerate(loaded):
        if carry is not None:
            buf = {k: np.concatenate([carry[k], v]) for k, v in buf.items()}
        m = len(next(iter(buf.values())))
        full = m if i == len(groups) - 1 else (m // batch_size) * batch_size
        for b in range(0, full, batch_size):
            yield to_batch({k: v[b:b + batch_size] for k, v in buf.items()}, pin_memory)
        carry = {k: v[full:] for k, v in buf.items()} if full < m else None


def _load_group(store, split, group: Group, chunk: int, n: int, layers, fields, workers) -> dict[str, np.ndarray]:
    """The group's examples in yield order: whole chunks are read (decompressed in parallel), then gathered."""
    starts = [c * chunk for c in group.chunks]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # blosc releases the GIL: chunks decompress in parallel
        parts = list(pool.map(lambda s: store.read(split, s, min(s + chunk, n), layers, fields), starts))
    chunk_of_row, local = group.rows // chunk, group.rows % chunk
    out = {}
    for k in fields:  # gather straight from the chunks into the group's order: one copy of the data
        first = parts[0][k]
        dest = np.empty((len(group.rows),) + first.shape[1:], first.dtype)
        for c, part in zip(group.chunks, parts):
            sel = chunk_of_row == c
            dest[sel] = part[k][local[sel]]
        out[k] = dest
    return out


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run the `items` generator `depth` items ahead on a thread; exceptions surface in the consumer.

    A consumer that stops early (max steps, a fractional epoch) releases the thread and what it holds.
    """
    if depth <= 0:
        yield from items
        return
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=work, name="pkd-cache-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


def to_batch(arrays: dict[str, np.ndarray], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Torch tensors (token ids as int64), cut to the batch's longest sequence; pinned for fast GPU copies."""
    batch = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        batch[k] = t.long() if k in TOKEN_ARRAYS else t
    batch = trim_padding(batch)
    return {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
