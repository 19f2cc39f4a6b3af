"""Chunk files, written and read by pkd-cache itself: Blosc frames, one per chunk, each with a recorded checksum.

zarr-python creates the arrays (their `zarr.json`), but the chunk bytes go through here. Reading a 20 MB chunk
through `array[a:b]` costs several times the Blosc decode itself (store access, the async codec pipeline, copies
into the output; benchmarks/RESULTS.md, B3). The arrays pkd-cache writes have one layout (docs/FORMAT.md): a
regular chunk grid, the default `c/<i>/<j>/...` chunk keys, and the codecs `bytes` (little endian) then `blosc`,
so a chunk is one Blosc frame: `ChunkReader` fetches it (a local file read or one fsspec request), checks its
CRC-32C against the store's manifest and decompresses it straight into the destination buffer in one call that
releases the GIL. An array with any other codecs goes through zarr, so results never depend on the path.
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from ..errors import PkdCacheError

class ChunkError(PkdCacheError):
    """A chunk that is missing, corrupt or undecodable: names the store and the chunk; `reason` says what."""

    def __init__(self, location, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"store {location}: chunk {key} {reason}; run `pkd-cache verify {location}`")


CHECKSUMS_KEY = "checksums.json"  # {"algorithm": "crc32c", "chunks": {"train/cls/c/0/3/0": [nbytes, crc32c]}}


def write_manifest(location, checksums: dict, metadata: dict) -> None:
    """Write `checksums.json` and record it in the metadata (before the complete flag is set)."""
    import json

    manifest = {"algorithm": "crc32c", "chunks": dict(sorted(checksums.items()))}
    location.write(CHECKSUMS_KEY, json.dumps(manifest, separators=(",", ":")).encode())
    metadata["checksums"] = {"file": CHECKSUMS_KEY, "algorithm": "crc32c", "chunks": len(checksums)}


def crc32c(data: bytes) -> int:
    import google_crc32c  # a zarr dependency; hardware CRC-32C (>10 GB/s)

    return int(google_crc32c.value(bytes(data) if not isinstance(data, (bytes, bytearray)) else data))


def blosc_params(array) -> Optional[dict]:
    """Blosc settings of an array whose chunks are single Blosc frames of little-endian C-order values, else None."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid

        meta = array.metadata
        codecs = tuple(meta.codecs)
    except (AttributeError, ImportError):  # zarr v2 arrays, other zarr versions
        return None
    if not isinstance(meta.chunk_grid, RegularChunkGrid) or len(codecs) != 2:
        return None
    if not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if np.dtype(array.dtype).itemsize > 1 and endian is not None and endian != "little":
        return None
    blosc = codecs[1]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[getattr(blosc.shuffle, "value", blosc.shuffle)]
    return {"cname": getattr(blosc.cname, "value", blosc.cname), "clevel": int(blosc.clevel), "shuffle": shuffle,
            "blocksize": int(blosc.blocksize or 0)}


def chunk_key(array, coords: tuple[int, ...]) -> str:
    return array.metadata.chunk_key_encoding.encode_chunk_key(coords)


def encode_chunk(values: np.ndarray, params: dict) -> bytes:
    """One chunk (already at the full chunk shape) as a Blosc frame, as zarr's `bytes` + `blosc` codecs write it."""
    import numcodecs.blosc

    values = np.ascontiguousarray(values)
    if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and sys.byteorder == "big"):
        values = values.astype(values.dtype.newbyteorder("<"))
    return numcodecs.blosc.compress(values, params["cname"].encode(), params["clevel"], params["shuffle"],
                                    params["blocksize"], values.dtype.itemsize)


class ArrayChunks:
    """What the stream needs of an array's chunk reader, for sources other than Zarr (Arrow shards, memory):
    `chunks`, `shape`, `dtype`, `buffer()` and `read_into(coords, out)`."""

    direct = True

    def __init__(self, array):
        self.array, self.chunks, self.shape = array, tuple(array.chunks), tuple(array.shape)
        self.dtype, self.fill_value = np.dtype(array.dtype), 0

    def buffer(self) -> np.ndarray:
        return np.empty(self.chunks, self.dtype)

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ChunkReader:
    """Chunks of one array of a store, each decoded into a C-contiguous buffer of the chunk's full shape."""

    def __init__(self, array, location, key: str, checksums: Optional[dict] = None):
        self.array, self.location, self.key = array, location, key
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.fill_value = array.fill_value
        self.checksums = checksums  # None: a store without a manifest (written before checksums existed)
        self.params = blosc_params(array)

    @property
    def direct(self) -> bool:
        return self.params is not None

    def buffer(self) -> np.ndarray:
        return np.empty(self.chunks, self.dtype)

    def chunk_name(self, coords: tuple[int, ...]) -> str:
        """How messages name a chunk: its key inside the array (`c/3/5/0`)."""
        return chunk_key(self.array, coords)

    def file_key(self, coords: tuple[int, ...]) -> str:
        """The chunk's path in the store and in the checksum manifest (`train/cls/c/3/5/0`)."""
        return f"{self.key}/{chunk_key(self.array, coords)}"

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        """Chunk `coords` (chunk-grid indices) into `out`; edge chunks are padded with the fill value."""
        if self.params is None:
            return self._read_with_zarr(coords, out)
        key = f"{self.key}/{chunk_key(self.array, coords)}"
        recorded = self.checksums.get(key) if self.checksums is not None else None
        try:
            data = self.location.read(key)
        except FileNotFoundError:
            if self.checksums is not None:
                raise ChunkError(self.location, key, "is missing") from None
            out[...] = self.fill_value  # zarr leaves out chunks that hold only the fill value
            return out
        if self.checksums is not None and recorded is None:
            raise ChunkError(self.location, key, "is not in the store's checksum manifest")
        if recorded is not None and (len(data) != recorded[0] or crc32c(data) != recorded[1]):
            raise ChunkError(self.location, key, "is corrupt (its checksum does not match the one recorded at dump "
                                                 "time)")
        import numcodecs.blosc

        try:
            numcodecs.blosc.decompress(data, out)
        except Exception as e:  # a truncated or altered chunk in a store without checksums
            raise ChunkError(self.location, key, f"cannot be decoded ({e}): the store is damaged") from e
        return out

    def _read_with_zarr(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        region = tuple(slice(c * k, min((c + 1) * k, n)) for c, k, n in zip(coords, self.chunks, self.shape))
        values = self.array[region]
        if values.shape != out.shape:
            out[...] = self.fill_value
        out[tuple(slice(0, s) for s in values.shape)] = values
        return out
