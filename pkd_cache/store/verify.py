"""`pkd-cache verify`: is a store complete, are its metadata consistent, does every chunk match its checksum?

Every chunk of every array is fetched, checked against the CRC-32C recorded at dump time and decoded; the values
get cheap sanity checks (finite floats, labels in range, 0/1 masks, ids inside the vocabulary). Problems are
collected, not raised, so one run names everything that is wrong.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import PkdCacheError
from ..progress import progress_bar


@dataclass
class Report:
    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks: int = 0
    bytes: int = 0
    checksummed: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str, storage_options: Optional[dict] = None) -> Report:
    from .reader import Store

    report = Report(path)
    store = Store(path, require_complete=False, storage_options=storage_options)  # format errors raise here
    meta = store.meta
    if not meta.get("complete"):
        report.problems.append("store: not complete (its dump did not finish or was interrupted)")
    expected = _expected_arrays(meta, report)
    if expected is None:
        return report
    try:
        checksums = store.checksums
    except PkdCacheError as e:
        report.problems.append(f"checksums: {e}")
        checksums = None
    if checksums is None:
        report.checksummed = False
        report.notes.append("no checksum manifest (a store written before pkd-cache recorded checksums): chunks "
                            "were decoded and their values checked, but corruption that still decodes goes unseen")
    seen_keys: set[str] = set()
    jobs = []
    for split, arrays in expected.items():
        for name, (shape, dtype) in arrays.items():
            try:
                reader = store.chunk_reader(split, name)
            except (KeyError, FileNotFoundError):
                report.problems.append(f"{split}/{name}: array missing")
                continue
            except PkdCacheError as e:
                report.problems.append(f"{split}/{name}: {str(e).removeprefix(f'store {path}: ')}")
                continue
            if reader.shape != shape or reader.dtype != np.dtype(dtype):
                report.problems.append(f"{split}/{name}: shape {reader.shape} {reader.dtype}, expected {shape} {dtype}")
                continue
            grid = [range(-(-s // c)) for s, c in zip(reader.shape, reader.chunks)]
            jobs += [(split, name, reader, coords) for coords in itertools.product(*grid)]
    with progress_bar(len(jobs), "verify", unit="chunks") as bar:
        for split, name, reader, coords in jobs:
            _check_chunk(split, name, reader, coords, meta, report, seen_keys)
            bar.advance(1)
    if checksums is not None:
        extra = sorted(set(checksums) - seen_keys)
        if extra:
            report.problems.append(f"checksums: {len(extra)} recorded chunk(s) belong to no array, e.g. {extra[0]}")
    return report


def _expected_arrays(meta: dict, report: Report) -> Optional[dict]:
    """{split: {array: (shape, dtype)}} from the metadata, or None (with the problem noted) if it is unusable."""
    from .format import expected_arrays

    try:
        _ = meta["teacher"]["weights_fingerprint"], meta["tokenizer"]["vocab_fingerprint"]
        out = expected_arrays(meta)
    except (KeyError, TypeError, ValueError) as e:
        report.problems.append(f"metadata: missing or malformed entry {e}")
        return None
    if not out:
        report.problems.append("metadata: no splits")
    return out


def _check_chunk(split, name, reader, coords, meta, report: Report, seen: set) -> None:
    from .chunks import ChunkError

    where = f"{split}/{name} chunk {reader.chunk_name(coords)}"
    seen.add(reader.file_key(coords))
    try:
        values = reader.read_into(coords, reader.buffer())
    except ChunkError as e:
        report.problems.append(f"{where} {e.reason}")
        return
    report.chunks += 1
    report.bytes += values.nbytes
    rows = min(reader.chunks[0], reader.shape[0] - coords[0] * reader.chunks[0])
    values = values[:rows]
    bad = _bad_values(name, values, meta)
    if bad:
        report.problems.append(f"{where}: {bad}")


def _bad_values(name: str, v: np.ndarray, meta: dict) -> Optional[str]:
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        return f"{int((~np.isfinite(v)).sum())} non-finite value(s)"
    if name == "attention_mask" and not np.isin(v, (0, 1)).all():
        return "attention mask values other than 0/1"
    if name == "input_ids":
        vocab = int(meta["tokenizer"].get("vocab_size") or 0)
        if v.min() < 0 or (vocab and v.max() >= vocab):
            return f"token ids outside the vocabulary [0, {vocab})"
    if name == "labels" and not meta["task"].get("is_regression"):
        if v.min() < 0 or v.max() >= int(meta["task"]["num_labels"]):
            return f"labels outside [0, {meta['task']['num_labels']})"
    return None
