"""In-memory arrays as chunk sources: online KD (pkd_cache/online.py) serves the task's tokenised examples through
the same stream a store's arrays go through, so both see the same batches in the same order."""
from __future__ import annotations

import numpy as np

from .backend import GridSource, Shape


class ArrayArray:
    """An in-memory array with the shape, dtype, chunks and path the chunk readers expect."""

    def __init__(self, values: np.ndarray, rows: int, path: str):
        self.values, self.path = values, path
        self.shape, self.dtype = tuple(values.shape), np.dtype(values.dtype)
        self.chunks = (min(rows, len(values)),) + tuple(values.shape[1:])

    def __getitem__(self, key):
        return self.values[key]


class ArrayChunkReader(GridSource):
    """The `backend.ChunkSource` interface over an in-memory array (chunks of rows; nothing to check: the values
    never left this process)."""

    def __init__(self, array: ArrayArray):
        self.array, self.shape, self.chunks, self.dtype = array, array.shape, array.chunks, array.dtype

    def chunk_name(self, coords: Shape) -> str:
        return f"{self.array.path}[{coords[0]}]"

    def file_key(self, coords: Shape) -> str:
        return self.array.path

    def read_into(self, coords: Shape, out: np.ndarray) -> np.ndarray:
        rows = self.chunks[0]
        part = self.array.values[coords[0] * rows:(coords[0] + 1) * rows]
        out[:len(part)] = part
        out[len(part):] = 0
        return out
