"""Incremental dumps: the rows a cached store already holds are copied, and the teacher runs only on the new ones.

A donor is a complete store of the team cache made by the same teacher, tokenizer and settings (its cache key
parts equal this dump's but for the data and the split names) that holds `example_hash` (store/arrays/
example_hash.py: a digest of each example's token arrays). Rows are matched in two steps (`window_arrays`):
- by `text_hash` (store/arrays/text_hash.py: a digest of the texts), when the donor holds it: such a row is found
  before tokenising, and its tokens are copied with the teacher's outputs (the same text, tokenizer and settings
  give the same tokens);
- the rest are tokenised, and a row whose token digest the donor holds gets the donor's outputs.
The teacher runs on what is left. Outputs copied are `logits`, `cls` and, for int8, `cls_scale`; labels always
come from this dump's own data.

Equal to a fresh dump up to float noise: a reused row was computed in another batch, and a batch's padding width
changes the float order of the teacher's forward. The tests hold reused rows to |a - b| <= 1e-5 + 1e-4 |b| for
float32 logits and 2e-3 + 1e-2 |b| for float16 CLS (tests/test_team_cache.py).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

from ..progress import log
from ..store.arrays.example_hash import NAME as HASH
from ..store.arrays.example_hash import row_hashes
from ..store.arrays.text_hash import NAME as TEXT
from ..store.cache import cache_url, entries
from ..store.format import TOKEN_DTYPES
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
    """A donor store's rows by example digest (and text digest, when it holds one), read a chunk at a time (checked
    like every read)."""

    def __init__(self, store):
        self.store = store
        self.has_text = TEXT in store.meta.extra_arrays
        self.index: dict[str, dict[bytes, tuple[str, int]]] = {HASH: {}, TEXT: {}}
        for split in store.meta.splits:
            for name in (HASH, TEXT) if self.has_text else (HASH,):
                index = self.index[name]
                for row, digest in enumerate(store.array(split, name)[:]):
                    index.setdefault(digest.tobytes(), (split, row))
        self.int8 = store.meta.cls_dtype == "int8"
        self._chunks: OrderedDict = OrderedDict()
        self.reused = 0

    @property
    def url(self) -> str:
        return self.store.path

    def lookup(self, digests: np.ndarray, by: str = HASH) -> list[Optional[tuple[str, int]]]:
        """Where the donor holds each row of `digests` (`by`: example_hash or text_hash digests), None where not."""
        index = self.index[by]
        return [index.get(d.tobytes()) for d in digests]

    def rows(self, places: list[tuple[str, int]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """{name: the donor's rows `places` of it, in that order} (`cls` as stored, or float32 dequantised from
        int8): each donor chunk they touch is read once (the rows of a grown, reshuffled dataset come in any
        order)."""
        size = self.store.meta.chunk_size
        by_chunk: dict[tuple[str, int], list[int]] = {}
        for i, (split, row) in enumerate(places):
            by_chunk.setdefault((split, row // size), []).append(i)
        out: dict[str, np.ndarray] = {}
        for (split, c), idx in sorted(by_chunk.items()):
            at = np.array([places[i][1] - c * size for i in idx])
            for name in names:
                values = self._read(split, c, name)[at]
                if name not in out:
                    out[name] = np.empty((len(places),) + values.shape[1:], values.dtype)
                out[name][idx] = values
        return out

    def _read(self, split: str, c: int, name: str) -> np.ndarray:
        """Chunk `c` of array `name` (CLS as stored: float16 stays float16, the dump's own dtype, with no float32
        round trip; int8 is dequantised to float32); the last few chunks are kept."""
        key = (split, name, c)
        if key not in self._chunks:
            size = self.store.meta.chunk_size
            rows = slice(c * size, (c + 1) * size)
            values = self.store.array(split, name)[rows]
            if name == "cls" and self.int8:
                values = dequantize_int8(values, self.store.array(split, "cls_scale")[rows], np.float32)
            self._chunks[key] = values
            while len(self._chunks) > 16:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(key)
        return self._chunks[key]

    def report(self, total: int) -> None:
        if self.reused:
            log(f"reused {self.reused:,} of {total:,} examples from {self.url}; teacher ran on "
                f"{total - self.reused:,}")


OUTPUTS = ("logits", "cls")


def window_arrays(donor: Donor, texts: np.ndarray, tokenize_rows: Callable[[np.ndarray], dict],
                  run: Callable[[dict], tuple[np.ndarray, np.ndarray]], cls_dtype) -> dict[str, np.ndarray]:
    """A window's arrays (tokens, example_hash, logits, cls) for its examples of text digests `texts`, reusing
    the donor's rows: those it holds by text are copied whole; the rest are tokenised (`tokenize_rows(rows)`: the
    token arrays of those window rows), and those of them it holds by token digest get its outputs; the teacher
    (`run(tokens)`: (logits, cls)) runs on what is left."""
    n, out = len(texts), {}

    def put(name: str, rows: np.ndarray, values: np.ndarray) -> None:
        if name not in out:  # logits are float32 and cls the dump's dtype whatever the donor's came as
            dtype = {"logits": np.float32, "cls": cls_dtype}.get(name, values.dtype)
            out[name] = np.empty((n,) + values.shape[1:], dtype)
        out[name][rows] = values

    def copy(places: list, rows: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        """Copy the donor's rows into `rows` where it holds them; the rows it does not."""
        held = np.array([p is not None for p in places], bool)
        if held.any():
            for name, values in donor.rows([p for p in places if p is not None], names).items():
                put(name, rows[held], values)
            donor.reused += int(held.sum())
        return rows[~held]

    rest = np.arange(n)
    if donor.has_text:
        rest = copy(donor.lookup(texts, TEXT), rest, tuple(TOKEN_DTYPES) + (HASH,) + OUTPUTS)
    if len(rest):
        tokens = tokenize_rows(rest)
        digests = row_hashes(tokens)
        for name, values in {**tokens, HASH: digests}.items():
            put(name, rest, values)
        todo = copy(donor.lookup(digests), rest, OUTPUTS)
        if len(todo):
            at = np.searchsorted(rest, todo)  # `rest` is sorted: where each row left to run is among the tokenised
            for name, values in zip(OUTPUTS, run({k: v[at] for k, v in tokens.items()})):
                put(name, todo, values)
    return out
