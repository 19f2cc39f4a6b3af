"""`pkd-cache verify`: is a store complete, are its metadata consistent, does every chunk match its checksum?

The same checks distill makes when it opens and reads a store (store/trust.py), collected rather than raised, so one
run names everything that is wrong: the metadata against each array and the manifest, then every chunk of every
array fetched, checked against the CRC-32C recorded at dump time, decoded and its values checked (finite floats,
labels in range, 0/1 masks, ids inside the vocabulary); a token store's coded targets are decoded too.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from ..errors import PkdCacheError
from ..progress import progress_bar
from .integrity import NO_MANIFEST_NOTE, ChunkError


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


def verify_store(path: str, storage_options: Optional[dict] = None, allow_no_checksums: bool = False) -> Report:
    """Everything wrong with the store at `path`. The layout (metadata against each array and the manifest) is
    checked first; the chunks are read only when it is sound, so a crafted size cannot make a list of 10^9 chunks.
    `allow_no_checksums` accepts a store without a manifest (pkd-cache 0.1.0), noting what is then not checked."""
    from .reader import Store

    report = Report(path)
    store = Store(path, require_complete=False, storage_options=storage_options,
                  allow_no_checksums=allow_no_checksums)  # format errors raise here
    if not store.complete:
        report.problems.append("store: not complete (its dump did not finish or was interrupted)")
    try:
        layout = store.layout_problems()
    except PkdCacheError as e:  # a manifest the metadata records but that is missing or malformed
        layout = [f"checksums: {str(e).removeprefix(f'store {path}: ')}"]
    report.problems += layout
    if layout:
        return report
    checksums = store.checksums
    if checksums is None:
        report.checksummed = False
        report.notes.append(NO_MANIFEST_NOTE)
    jobs = []
    for split, arrays in store.meta.expected_arrays().items():
        for name in arrays:
            reader = store.chunk_reader(split, name)
            grid = [range(-(-s // c)) for s, c in zip(reader.shape, reader.chunks)]
            jobs += [(split, name, reader, coords) for coords in itertools.product(*grid)]
    with progress_bar(len(jobs), "verify", unit="chunks") as bar:
        for split, name, reader, coords in jobs:
            _check_chunk(split, name, reader, coords, report)
            bar.advance(1)
    if store.meta.layout == "tokens" and report.ok:
        _check_token_rows(store, report)
    return report


def _check_token_rows(store, report: Report) -> None:
    """A token store's rows as distill decodes them: the sequence starts against the metadata, and every row's coded
    targets (store/token_targets.py: stream sizes, ids inside the vocabulary, counts summing to N, log-probs)."""
    from .token_stream import RowCache, sequence_offsets

    for split in store.splits:
        try:
            sequence_offsets(store, split)
            cache = RowCache(store, split, hidden=False, size=1)
            for r in range(store.num_examples(split)):
                cache.get(r)
        except PkdCacheError as e:
            report.problems.append(str(e).removeprefix(f"store {store.path}: ").split("; run `pkd-cache verify")[0])


def _check_chunk(split, name, reader, coords, report: Report) -> None:
    """One chunk read as distill reads it: its checksum, decoded size and values (the reader raises a ChunkError)."""
    try:
        values = reader.read_into(coords, reader.buffer())
    except ChunkError as e:
        report.problems.append(f"{split}/{name} chunk {reader.chunk_name(coords)} {e.reason}")
        return
    report.chunks += 1
    report.bytes += values.nbytes
