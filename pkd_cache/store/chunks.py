"""Chunk files, written and read by pkd-cache itself: Blosc frames, one per chunk, each with a recorded checksum.

zarr-python creates the arrays (their `zarr.json`), but the chunk bytes go through here. Reading a 20 MB chunk
through `array[a:b]` costs several times the Blosc decode itself (store access, the async codec pipeline, copies
into the output; benchmarks/RESULTS.md, B3). The arrays pkd-cache writes have one layout (docs/FORMAT.md): a
regular chunk grid, the default `c/<i>/<j>/...` chunk keys, and the codecs `bytes` (little endian) then `blosc`,
so a chunk is one Blosc frame: `ChunkReader` fetches it (a local file read or one fsspec request), checks its
CRC-32C against the store's manifest and decompresses it straight into the destination buffer in one call that
releases the GIL. An array in any other layout is refused when the store is opened (store/trust.py): another
codec chain could make the checksummed bytes mean other values.
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
    """Chunks of one Zarr array of a store, each fetched as one file, checked and decoded into a C-contiguous buffer
    of the chunk's full shape. No zarr here: `Store` has checked the array's `zarr.json` against the metadata
    (store/trust.py), so the layout is pkd-cache's own (default chunk keys, `bytes` little endian then `blosc`)."""

    direct = True

    def __init__(self, location, key: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype,
                 checksums: Optional[dict] = None):
        self.location, self.key = location, key
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), np.dtype(dtype)
        self.fill_value = 0
        self.checksums = checksums  # None: a store without a manifest, opened with --allow-no-checksums

    def buffer(self) -> np.ndarray:
        return np.empty(self.chunks, self.dtype)

    def chunk_name(self, coords: tuple[int, ...]) -> str:
        """How messages name a chunk: its key inside the array (`c/3/5/0`)."""
        return "c/" + "/".join(map(str, coords))

    def file_key(self, coords: tuple[int, ...]) -> str:
        """The chunk's path in the store and in the checksum manifest (`train/cls/c/3/5/0`)."""
        return f"{self.key}/{self.chunk_name(coords)}"

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        """Chunk `coords` (chunk-grid indices) into `out` (the full chunk shape). Every chunk must exist (pkd-cache
        writes them all), match the manifest, and decode to exactly the buffer's size."""
        import numcodecs.blosc

        key = self.file_key(coords)
        try:
            data = self.location.read(key)
        except FileNotFoundError:
            raise ChunkError(self.location, key, "is missing") from None
        check_recorded(self.location, key, data, self.checksums)
        nbytes, cbytes = blosc_sizes(data)
        if cbytes != len(data):
            raise ChunkError(self.location, key, "is not a whole Blosc frame: the store is damaged")
        if nbytes != out.nbytes:
            raise ChunkError(self.location, key, f"decodes to {nbytes:,} bytes where its array's chunk holds "
                                                 f"{out.nbytes:,}: the store is damaged")
        try:
            numcodecs.blosc.decompress(data, out)
        except Exception as e:  # a truncated or altered chunk in a store without checksums
            raise ChunkError(self.location, key, f"cannot be decoded ({e}): the store is damaged") from e
        return out


def blosc_sizes(data: bytes) -> tuple[int, int]:
    """(decoded bytes, frame bytes) from a Blosc frame's 16-byte header (both little-endian uint32, at offsets 4 and
    12): read before decoding, so a chunk never decodes into a buffer of another size."""
    if len(data) < 16:
        return -1, -1
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")


def check_recorded(location, key: str, data: bytes, checksums: Optional[dict]) -> None:
    """A chunk file's bytes against the manifest (nothing to compare with when the store has none)."""
    if checksums is None:
        return
    recorded = checksums.get(key)
    if recorded is None:
        raise ChunkError(location, key, "is not in the store's checksum manifest")
    if len(data) != recorded[0] or crc32c(data) != recorded[1]:
        raise ChunkError(location, key, "is corrupt (its checksum does not match the one recorded at dump time)")
