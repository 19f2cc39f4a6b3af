"""Whole-chunk reads straight into caller buffers, bypassing zarr-python's read path where the layout allows.

Reading a 20 MB `cls` chunk through `array[a:b]` costs several times the Blosc decode itself (store access, the
async codec pipeline, copies into the output; benchmarks/RESULTS.md, B3). The arrays pkd-cache writes have one
layout (docs/FORMAT.md): a regular chunk grid, the default `c/<i>/<j>/...` chunk keys, and the codecs
`bytes` (little endian) then `blosc`. For such an array in a local store a chunk is one file: `ChunkReader`
reads it and decompresses it into the destination buffer in one call that releases the GIL. Any other layout
or store goes through zarr, so the result never depends on which path ran.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PkdCacheError


class ChunkReader:
    """Chunks of one zarr v3 array, each decoded into a C-contiguous buffer of the chunk's full shape."""

    def __init__(self, array):
        self.array = array
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.fill_value = array.fill_value
        self._dir = _direct_chunk_dir(array)
        self._encode_key = array.metadata.chunk_key_encoding.encode_chunk_key

    @property
    def direct(self) -> bool:
        return self._dir is not None

    def buffer(self) -> np.ndarray:
        return np.empty(self.chunks, self.dtype)

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        """Chunk `coords` (chunk-grid indices) into `out`; edge chunks are padded with the fill value."""
        if self._dir is None:
            return self._read_with_zarr(coords, out)
        path = self._dir / self._encode_key(coords)
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # zarr does not write chunks that hold only the fill value
            out[...] = self.fill_value
            return out
        import numcodecs.blosc

        try:
            numcodecs.blosc.decompress(data, out)
        except Exception as e:  # a truncated or altered chunk file
            raise PkdCacheError(f"chunk {path} cannot be decoded ({e}); the store is damaged") from e
        return out

    def _read_with_zarr(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        region = tuple(slice(c * k, min((c + 1) * k, n)) for c, k, n in zip(coords, self.chunks, self.shape))
        values = self.array[region]
        if values.shape != out.shape:
            out[...] = self.fill_value
        out[tuple(slice(0, s) for s in values.shape)] = values
        return out


def _direct_chunk_dir(array) -> Optional[Path]:
    """The array's folder when its chunks can be read as single Blosc frames from local files, else None."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        meta = array.metadata
        store = array.store_path.store
        codecs = tuple(meta.codecs)
    except (AttributeError, ImportError):  # zarr v2 arrays, other zarr versions
        return None
    if not isinstance(store, LocalStore) or not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if np.dtype(array.dtype).itemsize > 1 and endian is not None and endian != sys.byteorder:
        return None
    return Path(store.root) / array.store_path.path
