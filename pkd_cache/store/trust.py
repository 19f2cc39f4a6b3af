"""Distrust what you open: a store's metadata is checked against its arrays and its checksum manifest before
anything is allocated, and every chunk's values are checked as they are decoded.

A store may come from someone else, and every part of it can be edited: the metadata, an array's `zarr.json`, the
manifest, the chunks. So nothing read from a store is believed on its own (safetensors' header checks are the
model):

- the metadata must have the types and ranges the format says (docs/FORMAT.md), and promises arrays of known
  shapes and dtypes (`format.expected_arrays`);
- each array's `zarr.json` must describe exactly that array, in the one layout pkd-cache writes (regular chunks
  along N, `bytes` little-endian then `blosc`, default chunk keys): no codec chain can change what the bytes mean
  or bypass the checksums;
- the manifest must list every chunk of that layout and nothing else. Its size bounds everything: a crafted size of
  10^12 rows would need 10^9 manifest entries, so it is refused by arithmetic before any list or buffer is made;
- every chunk is checked against the manifest on every read (integrity.ChunkFiles), its decoded size against the
  buffer (chunks.decode_frame; the Arrow reader checks each column's rows and type), and its values
  (`value_problem`, applied to every read by backend.CheckedChunks: finite floats, labels in range, 0/1 masks, ids
  inside the vocabulary). The manifest itself is loaded and checked against the layout in store/integrity.py.

A store without a manifest (pkd-cache 0.1.0 wrote such stores before checksums existed, and removing
checksums.json is the easiest tampering) is refused unless the caller explicitly allows it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..logit_spec import KINDS as LOGIT_KINDS
from ..logit_spec import LogitSpec
from .arrays import BY_NAME
from .format import CLS_DTYPES, LAYOUTS, chunk_shape
from .token_targets import slot_bytes

if TYPE_CHECKING:
    from .format import StoreMeta

# the layout pkd-cache writes (docs/FORMAT.md); anything else could make the same bytes mean other values
DEFAULT_KEYS = {"name": "default", "configuration": {"separator": "/"}}


def _int(value, at_least: int, at_most: int = 2 ** 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and at_least <= value <= at_most


# Sizes no real store comes near, so a crafted one cannot make a reader allocate a huge buffer: a chunk is decoded
# into a buffer of its full shape, and a Blosc frame holds at most 2 GiB anyway.
LIMITS = {"teacher.num_layers": 1024, "teacher.hidden_size": 65536, "tokenizer.vocab_size": 2 ** 31 - 1,
          "max_seq_length": 1 << 20, "chunk_size": 1 << 20, "task.num_labels": 1 << 20}
MAX_CHUNK_BYTES = 2 ** 31 - 1


def meta_problems(meta: dict) -> list[str]:
    """What is malformed in the metadata's entries that size the arrays (types and ranges)."""
    problems = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(f"metadata: {what}")

    teacher, task, tok = meta.get("teacher"), meta.get("task"), meta.get("tokenizer")
    if not (isinstance(teacher, dict) and isinstance(task, dict) and isinstance(tok, dict)):
        return ["metadata: missing or malformed teacher, task or tokenizer entry"]
    for key, value in (("teacher.num_layers", teacher.get("num_layers")),
                       ("teacher.hidden_size", teacher.get("hidden_size")),
                       ("tokenizer.vocab_size", tok.get("vocab_size")), ("max_seq_length", meta.get("max_seq_length")),
                       ("chunk_size", meta.get("chunk_size"))):
        need(_int(value, 1, LIMITS[key]), f"{key} {value!r} is not an integer in [1, {LIMITS[key]:,}]")
    need(meta.get("cls_dtype") in CLS_DTYPES, f"cls_dtype {meta.get('cls_dtype')!r} is not one of "
                                              f"{', '.join(CLS_DTYPES)}")
    labels, regression = task.get("num_labels"), task.get("is_regression")
    need(isinstance(regression, bool), f"task.is_regression {regression!r} is not true or false")
    need(_int(labels, 1, LIMITS["task.num_labels"]), f"task.num_labels {labels!r} is not an integer in "
                                                      f"[1, {LIMITS['task.num_labels']:,}]")
    layout = meta.get("layout", "examples")
    need(layout in LAYOUTS and meta.get("format_version") == LAYOUTS.get(layout),
         f"layout {layout!r} of format version {meta.get('format_version')!r} is not one pkd-cache writes")
    if layout == "tokens":
        problems += _token_problems(meta, need)
    elif regression is False and _int(labels, 1):
        names = task.get("label_names")
        need(isinstance(names, list) and len(names) == labels, f"task.label_names {names!r} does not name "
                                                               f"{labels} labels")
    extras = meta.get("extra_arrays", [])
    need(isinstance(extras, list) and all(isinstance(e, str) and e in BY_NAME for e in extras),
         f"extra_arrays {extras!r} is not a list of array names pkd-cache knows")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        problems.append("metadata: no splits")
    else:
        for name, split in splits.items():
            n = split.get("num_examples") if isinstance(split, dict) else None
            need(_int(n, 1), f"splits.{name}.num_examples {n!r} is not an integer >= 1")
    return problems


def _token_problems(meta: dict, need) -> list[str]:
    """A token store's `lm` entry and split sizes (store/arrays/lm.py): what sizes its arrays must be consistent,
    and the row size of its coded targets is derived, never read."""
    lm, problems = meta.get("lm"), []
    if not isinstance(lm, dict):
        return ["metadata: a token store has no `lm` entry"]
    vocab, layers = meta["tokenizer"].get("vocab_size"), meta["teacher"].get("num_layers")
    c, spec = lm.get("chunk_tokens"), lm.get("targets")
    need(meta.get("chunk_size") == 1, f"chunk_size {meta.get('chunk_size')!r} is not 1 (one row of tokens per chunk)")
    need(_int(c, 1, 1 << 24), f"lm.chunk_tokens {c!r} is not an integer in [1, {1 << 24:,}]")
    need(lm.get("id_dtype") in ("uint8", "uint16", "uint32") and _int(vocab, 1) and
         np.iinfo(lm["id_dtype"]).max >= vocab - 1, f"lm.id_dtype {lm.get('id_dtype')!r} does not hold the vocabulary")
    ok = isinstance(spec, dict) and spec.get("kind") in LOGIT_KINDS and (
        spec["kind"] == "none" or (_int(spec.get("count"), 1, 1 << 20) and _int(spec.get("seed"), 0) and
                                   isinstance(spec.get("temperature"), (int, float)) and
                                   math.isfinite(spec["temperature"]) and spec["temperature"] > 0))
    need(ok, f"lm.targets {spec!r} is not a logit spec (kind, count, seed, temperature)")
    if ok and _int(c, 1, 1 << 24) and _int(vocab, 1, LIMITS["tokenizer.vocab_size"]):
        parsed = LogitSpec(spec["kind"], int(spec.get("count") or 0))
        need(parsed.kind != "topk" or parsed.count <= vocab, f"lm.targets: top-{parsed.count} of {vocab} ids")
        need(lm.get("target_slot") == slot_bytes(parsed, vocab, c) and lm.get("target_parts") == parsed.parts,
             f"lm.target_slot {lm.get('target_slot')!r} / target_parts {lm.get('target_parts')!r} are not those of "
             f"{parsed} at {c} tokens per row")
    hidden = lm.get("hidden_layers")
    need(isinstance(hidden, list) and len(set(map(str, hidden))) == len(hidden) and
         all(_int(h, 0, layers if _int(layers, 1) else 0) for h in hidden),
         f"lm.hidden_layers {hidden!r} is not a list of distinct layers in [0, {layers}]")
    need(lm.get("hidden_dtype") == meta.get("cls_dtype"), "lm.hidden_dtype differs from cls_dtype")
    for name, split in (meta.get("splits") or {}).items() if isinstance(meta.get("splits"), dict) else ():
        rows = split.get("num_examples") if isinstance(split, dict) else None
        t, s = (split.get("num_tokens"), split.get("num_sequences")) if isinstance(split, dict) else (None, None)
        if _int(rows, 1) and _int(c, 1):
            need(_int(t, (rows - 1) * c + 1, rows * c), f"splits.{name}.num_tokens {t!r} does not fill {rows} rows "
                                                          f"of {c} tokens")
            need(_int(s, 1, t if _int(t, 1) else 1), f"splits.{name}.num_sequences {s!r} is not in [1, num_tokens]")
    return problems


def chunk_shapes(name: str, shape: tuple[int, ...], chunk_size: int) -> list[tuple[int, ...]]:
    """The chunk shapes pkd-cache writes for an array: whole along every axis but N; `cls` one layer per chunk, or
    (stores of 0.1.0) every layer in one chunk."""
    whole = (min(chunk_size, shape[0]),) + tuple(shape[1:])
    written = chunk_shape(name, shape, chunk_size)
    return [written, whole] if written != whole else [whole]


def zarr_array_problem(doc: dict, shape: tuple[int, ...], dtype: str, chunk_size: int, name: str) -> Optional[str]:
    """Why an array's `zarr.json` is not exactly the array the metadata promises in pkd-cache's layout, or None."""
    if not isinstance(doc, dict) or doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
        return "is not a Zarr v3 array"
    if doc.get("data_type") != dtype:
        return f"has data type {doc.get('data_type')!r}, the metadata says {dtype}"
    if tuple(doc.get("shape") or ()) != tuple(shape):
        return f"has shape {tuple(doc.get('shape') or ())}, the metadata says {tuple(shape)}"
    grid = doc.get("chunk_grid") or {}
    chunks = tuple((grid.get("configuration") or {}).get("chunk_shape") or ())
    if grid.get("name") != "regular" or chunks not in chunk_shapes(name, shape, chunk_size):
        return f"has chunks {chunks or grid!r}, not the layout pkd-cache writes {chunk_shapes(name, shape, chunk_size)[0]}"
    if math.prod(chunks) * np.dtype(dtype).itemsize > MAX_CHUNK_BYTES:
        return f"has chunks {chunks} of more than {MAX_CHUNK_BYTES:,} bytes, more than a Blosc frame holds"
    codecs = doc.get("codecs") or []
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    endian = (codecs[0].get("configuration") or {}).get("endian") if names[:1] == ["bytes"] else None
    if names != ["bytes", "blosc"] or (np.dtype(dtype).itemsize > 1 and endian != "little"):
        return (f"uses codecs {names!r}; pkd-cache reads only its own layout (bytes, little endian, then blosc), so that "
                f"the checksummed bytes mean what they meant at dump time")
    if doc.get("storage_transformers"):
        return "uses storage transformers, which pkd-cache does not open"
    if doc.get("chunk_key_encoding", DEFAULT_KEYS) != DEFAULT_KEYS:
        return f"uses chunk key encoding {doc.get('chunk_key_encoding')!r}, not the default `c/<i>/<j>`"
    return None


def chunk_count(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    return math.prod(-(-s // c) for s, c in zip(shape, chunks))


def chunk_keys(prefix: str, shape: tuple[int, ...], chunks: tuple[int, ...]):
    """Every chunk key of an array in the default encoding (`train/cls/c/3/5/0`); only after `chunk_count` has been
    bounded by the manifest's size."""
    import itertools

    for coords in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks))):
        yield f"{prefix}/c/" + "/".join(map(str, coords))


# for a float of each size: the exponent bits of inf and NaN. Read as a signed int, a positive inf or NaN is
# >= these bits (every positive finite float is below); read as unsigned, a negative one is >= these bits with the
# sign bit set (every negative finite float is below, and every positive one too)
_INF_BITS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}

try:  # the compiled one-pass check (store/_bits.c); optional, so a build without a C compiler still reads stores
    from ._bits import non_finite as _one_pass
except ImportError:  # pragma: no cover - exercised by the tests through non_finite_numpy
    _one_pass = None


def non_finite(v: np.ndarray) -> bool:
    """Whether a float array holds inf or NaN: one read-only pass over its bits in C (store/_bits.c, about twice
    as fast), or `non_finite_numpy` where that was not built. Both give the same answer for every bit pattern."""
    flat = np.ascontiguousarray(v).reshape(-1)
    if _one_pass is not None and flat.dtype.isnative:
        return _one_pass(flat, flat.dtype.itemsize)
    return non_finite_numpy(flat.astype(flat.dtype.newbyteorder("="), copy=False))


def non_finite_numpy(v: np.ndarray) -> bool:
    """`non_finite` in numpy: two read-only max passes over the bits (float16 reductions and np.isfinite are
    several times slower, and an AND pass writes a copy)."""
    size = v.dtype.itemsize
    flat = np.ascontiguousarray(v).reshape(-1)
    inf = _INF_BITS[size]
    return int(flat.view(f"i{size}").max()) >= inf or int(flat.view(f"u{size}").max()) >= inf | (1 << (8 * size - 1))


def value_problem(name: str, v: np.ndarray, meta: StoreMeta) -> Optional[str]:
    """Why decoded values cannot be what a dump wrote, or None: any float array must be finite, and each array kind
    checks its own values (store/arrays/: labels and ids in range, 0/1 masks).

    About as cheap as the CRC (benchmarks/RESULTS.md, B3): one read-only pass over the bits, no float arithmetic
    (`non_finite`); ids and labels are one max over their bits read as unsigned (`arrays.kind`)."""
    if v.size == 0:
        return None
    if v.dtype.kind == "f":
        if non_finite(v):
            return f"holds {int((~np.isfinite(v)).sum())} non-finite value(s)"
    kind = BY_NAME.get(name)
    return kind.check(v, meta) if kind is not None and kind.check is not None else None
