"""What a store backend is: a chunk source to read, a chunk sink to write, and the layout checks between them.

A store format (Zarr, Arrow, ...) is one module implementing `Backend`, registered by name in store/registry.py;
an in-memory array is a `ChunkSource` too (store/memory.py). Every reader (the batch stream, `Store.array`,
`pkd-cache verify`) reads a store only through `checked_source`: the backend fetches each chunk file through
`integrity.ChunkFiles` (its bytes against the manifest) and `CheckedChunks` checks the decoded values
(store/trust.py), so no backend can hand out an unchecked chunk.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Optional, Protocol, Sequence

import numpy as np

from .integrity import ChunkError
from .trust import value_problem

if TYPE_CHECKING:
    from .format import StoreMeta
    from .integrity import ChunkFiles
    from .location import Location

Shape = tuple[int, ...]


class ChunkSource(Protocol):
    """One array read chunk by chunk: what the stream and `verify` need. Chunk coordinates index the chunk grid
    (`shape` divided by `chunks`, rounded up); every chunk is read at its full shape, padded with zeros."""

    shape: Shape
    chunks: Shape
    dtype: np.dtype

    def chunk_name(self, coords: Shape) -> str:
        """How messages name the chunk inside its array."""

    def file_key(self, coords: Shape) -> str:
        """The file holding the chunk, as the checksum manifest names it."""

    def buffer(self) -> np.ndarray:
        """A fresh array of the full chunk shape (the stream reuses one per thread)."""

    def read_into(self, coords: Shape, out: np.ndarray) -> np.ndarray:
        """Chunk `coords` into `out` (the full chunk shape); returns `out`."""


class ChunkSink(Protocol):
    """A store being written: `create_split` the arrays, `write` chunk-aligned blocks (recorded durable once their
    files are in place), `finish` (the manifest, then the complete flag, last) or `close` (stays resumable)."""

    metadata: dict
    location: Location
    checksums: dict[str, list[int]]  # {file key: [nbytes, crc32c]} of the chunks written (or found durable)
    durable: dict[str, set[int]]  # {split: chunks whose files are all in place}

    def load_durable(self, split: str) -> set[int]: ...

    def create_split(self, split: str, shapes: dict[str, tuple], split_meta: dict) -> None: ...

    def write(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None: ...

    def durable_examples(self) -> int: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class LayoutProblem(Exception):
    """Why an array's stored description disagrees with the metadata (a message, prefixed `split/array: `)."""


class Backend(Protocol):
    """One store format. Constructed by `Store` for the store it opens (its location and checked metadata); the
    class itself names the format, says which file holds the metadata and writes new stores (`sink`)."""

    name: ClassVar[str]  # as `dump --format` and the metadata's `store_format` name it
    meta_key: ClassVar[str]  # the file whose JSON holds the metadata (format.META_FILES)
    sink: ClassVar[Callable[..., ChunkSink]]  # sink(location, metadata, resume=False, extend=False), the writer

    def __init__(self, location: Location, meta: StoreMeta): ...

    @staticmethod
    def metadata_in(doc) -> Optional[dict]:
        """The metadata inside the parsed `meta_key` document, None if it holds none."""

    def chunks_of(self, split: str, name: str, shape: Shape, dtype: str) -> Shape:
        """The chunk shape of an array, once its stored description is checked; raises LayoutProblem."""

    def file_keys(self, grids: dict[str, tuple[Shape, Shape]]) -> tuple[dict[str, int], Callable[[], Iterable[str]]]:
        """({group: file count}, a function yielding every file key) of the layout, for the manifest check."""

    def source(self, split: str, name: str, shape: Shape, dtype: str, chunks: Shape,
               files: ChunkFiles) -> ChunkSource:
        """The raw reader of one array, fetching its files through `files`."""


class GridSource:
    """Shared by the sources: a chunk buffer and the grid. Subclasses set `shape`, `chunks`, `dtype`."""

    shape: Shape
    chunks: Shape
    dtype: np.dtype

    def buffer(self) -> np.ndarray:
        return np.empty(self.chunks, self.dtype)

    def rows_in(self, coords: Shape) -> int:
        """Rows of chunk `coords` that hold examples (the last chunk along N may be partly padding)."""
        return min(self.chunks[0], self.shape[0] - coords[0] * self.chunks[0])


class CheckedChunks:
    """A backend's chunk source whose every chunk also has its values checked (`trust.value_problem`) once
    decoded: verify, distill and `Store.array` all read through this, so none of them trusts a chunk unchecked."""

    def __init__(self, reader: ChunkSource, name: str, meta: StoreMeta, location, passed: Optional[set] = None):
        """`passed`: names of the chunks whose values were checked, shared by the store's readers, when every read
        is checked against the manifest (so a chunk read again is byte for byte the one checked); None: always."""
        self.reader, self.name, self.meta, self.location, self.passed = reader, name, meta, location, passed
        self.shape, self.chunks, self.dtype = reader.shape, reader.chunks, reader.dtype

    def buffer(self) -> np.ndarray:
        return self.reader.buffer()

    def chunk_name(self, coords: Shape) -> str:
        return self.reader.chunk_name(coords)

    def file_key(self, coords: Shape) -> str:
        return self.reader.file_key(coords)

    def read_into(self, coords: Shape, out: np.ndarray) -> np.ndarray:
        out = self.reader.read_into(coords, out)
        seen = f"{self.name}:{self.reader.file_key(coords)}:{self.reader.chunk_name(coords)}"
        if self.passed is not None and seen in self.passed:
            return out
        rows = min(self.chunks[0], self.shape[0] - coords[0] * self.chunks[0])
        why = value_problem(self.name, out[:rows], self.meta)
        if why:
            raise ChunkError(self.location, self.reader.file_key(coords), why)
        if self.passed is not None:
            self.passed.add(seen)
        return out


def checked_source(backend: Backend, split: str, name: str, shape: Shape, dtype: str, chunks: Shape,
                   files: ChunkFiles, meta: StoreMeta, passed: Optional[set]) -> CheckedChunks:
    """The one way a store's array is read: the backend's source over checksum-checked files, its values checked.
    With a manifest (`passed` given), a chunk that passed once is passed again: every later read of it is checked
    against the same size and CRC, so its values are the ones already checked."""
    return CheckedChunks(backend.source(split, name, shape, dtype, chunks, files), name, meta, files.location,
                         passed if files.checksums is not None else None)


class ChunkedArray:
    """Row slices of one array, read chunk by chunk through a (checked) chunk source, for any backend."""

    def __init__(self, reader: ChunkSource):
        self.reader, self.shape, self.dtype, self.chunks = reader, reader.shape, reader.dtype, reader.chunks

    def __getitem__(self, key) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        if not isinstance(rows, slice):
            rows = slice(rows, rows + 1) if rows >= 0 else slice(rows, (rows + 1) or None)
        start, stop, step = rows.indices(self.shape[0])
        r, parts = self.chunks[0], []
        for c in range(start // r, -(-stop // r)) if stop > start else ():
            parts.append(self._whole_chunk(c)[max(0, start - c * r):stop - c * r])
        out = np.concatenate(parts)[::step] if parts else np.empty((0,) + tuple(self.shape[1:]), self.dtype)
        return out[(slice(None),) + key[1:]] if isinstance(key, tuple) else out

    def chunk(self, c: int, columns: Optional[Sequence[int]] = None) -> np.ndarray:
        """The rows of chunk row `c` that hold examples, with only `columns` along axis 1 when given (a per-layer
        array then reads only those layers' chunks)."""
        rows = min(self.chunks[0], self.shape[0] - c * self.chunks[0])
        if columns is None or len(self.shape) < 2:
            return self._whole_chunk(c)[:rows]
        if self.chunks[1] != 1:  # several columns per chunk (the 0.1.0 layout): read them all, keep some
            return self._whole_chunk(c)[:rows][:, list(columns)]
        tail = (0,) * (len(self.shape) - 2)
        return np.concatenate([self.reader.read_into((c, j) + tail, self.reader.buffer())[:rows].copy()
                               for j in columns], axis=1)

    def _whole_chunk(self, c: int) -> np.ndarray:
        """Chunk row `c` with every chunk along axis 1 (a layered array's per-layer chunks) side by side."""
        if len(self.shape) == 1:
            return self.reader.read_into((c,), self.reader.buffer()).copy()
        width = self.chunks[1]
        blocks = [self.reader.read_into((c, j) + (0,) * (len(self.shape) - 2), self.reader.buffer()).copy()
                  for j in range(-(-self.shape[1] // width))]
        return np.concatenate(blocks, axis=1)
