"""Incremental dumps: the rows a cached store already holds are copied, and the teacher runs only on the new ones.

A donor is a complete store of the team cache made by the same teacher, tokenizer and settings (its cache key
parts equal this dump's but for the data and the split names) that holds `example_hash` (store/arrays/
example_hash.py: a digest of each example's token arrays). An example of this dump whose digest the donor holds
gets the donor's teacher outputs (`logits`, `cls` and, for int8, `cls_scale`); its tokens and label come from this
dump's own data, as for every other example.

Equal to a fresh dump up to float noise: a reused row was computed in another batch, and a batch's padding width
changes the float order of the teacher's forward. The tests hold reused rows to |a - b| <= 1e-5 + 1e-4 |b| for
float32 logits and 2e-3 + 1e-2 |b| for float16 CLS (tests/test_team_cache.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from ..progress import log
from ..store.arrays.example_hash import NAME as HASH
from ..store.cache import cache_url, entries
from ..store.location import Location
from ..store.quantize import dequantize_int8
from ..store.registry import read_metadata

_KEY_SETTINGS_IGNORED = ("splits",)  # a donor may hold other splits: rows are matched wherever they are


def _same_making(a: dict, b: dict) -> bool:
    """Whether two dumps' key parts say the same teacher, tokenizer and settings (the data may differ)."""
    settings = [{k: v for k, v in (p.get("settings") or {}).items() if k not in _KEY_SETTINGS_IGNORED} for p in (a, b)]
    return a.get("teacher") == b.get("teacher") and a.get("tokenizer") == b.get("tokenizer") and \
        settings[0] == settings[1]


def find_donor(cache: Optional[str], task: str, key_parts: dict, out: str) -> Optional["Donor"]:
    """The largest complete store of `task` in the cache that this dump can reuse rows of, None if none."""
    cache = cache_url(cache)
    if cache is None:
        return None
    root, best = Location(cache), None
    try:
        found = entries(cache)
    except Exception:  # noqa: BLE001 - a cache that cannot be listed has no donor; the dump itself says why if it matters
        return None
    for name, _ in found:
        url = f"{cache.rstrip('/')}/{name}"
        if not name.startswith(f"{task}/") or url.rstrip("/") == out.rstrip("/"):
            continue
        meta = read_metadata(root.child(name)) or {}
        if not meta.get("complete") or HASH not in (meta.get("extra_arrays") or []):
            continue
        if _same_making(meta.get("cache_key_parts") or {}, key_parts):
            rows = sum(int(s.get("num_examples", 0)) for s in (meta.get("splits") or {}).values())
            if best is None or rows > best[0]:
                best = (rows, url)
    if best is None:
        return None
    from ..store.reader import open_store

    return Donor(open_store(best[1]))


class Donor:
    """A donor store's rows by example digest, read a chunk at a time (checked like every read)."""

    def __init__(self, store):
        self.store, self.index = store, {}
        for split in store.meta.splits:
            for row, digest in enumerate(store.array(split, HASH)[:]):
                self.index.setdefault(digest.tobytes(), (split, row))
        self.int8 = store.meta.cls_dtype == "int8"
        self._chunks: OrderedDict = OrderedDict()
        self.reused = 0

    @property
    def url(self) -> str:
        return self.store.path

    def lookup(self, digests: np.ndarray) -> list[Optional[tuple[str, int]]]:
        return [self.index.get(d.tobytes()) for d in digests]

    def outputs(self, places: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(logits, cls: as stored, or float32 dequantised from int8) of the donor's rows `places`, in that order:
        each donor chunk they touch is read once (the rows of a grown, reshuffled dataset come in any order)."""
        size = self.store.meta.chunk_size
        by_chunk: dict[tuple[str, int], list[int]] = {}
        for i, (split, row) in enumerate(places):
            by_chunk.setdefault((split, row // size), []).append(i)
        logits = cls = None
        for (split, c), idx in sorted(by_chunk.items()):
            at = np.array([places[i][1] - c * size for i in idx])
            lg, cl = self._read(split, c, "logits")[at], self._read(split, c, "cls")[at]
            if logits is None:
                logits = np.empty((len(places),) + lg.shape[1:], np.float32)
                cls = np.empty((len(places),) + cl.shape[1:], cl.dtype)
            logits[idx], cls[idx] = lg, cl
        self.reused += len(places)
        return logits, cls

    def _read(self, split: str, c: int, name: str) -> np.ndarray:
        """Chunk `c` of array `name` (CLS as stored: float16 stays float16, the dump's own dtype, with no float32
        round trip; int8 is dequantised to float32); the last few are kept."""
        key = (split, name, c)
        if key not in self._chunks:
            size = self.store.meta.chunk_size
            rows = slice(c * size, (c + 1) * size)
            values = self.store.array(split, name)[rows]
            if name == "cls" and self.int8:
                values = dequantize_int8(values, self.store.array(split, "cls_scale")[rows], np.float32)
            self._chunks[key] = values
            while len(self._chunks) > 4:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(key)
        return self._chunks[key]

    def report(self, total: int) -> None:
        if self.reused:
            log(f"reused {self.reused:,} of {total:,} examples from {self.url}; teacher ran on "
                f"{total - self.reused:,}")
