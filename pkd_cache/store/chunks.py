"""Chunk files, written and read by pkd-cache itself: Blosc frames, one per chunk, each with a recorded checksum.

zarr-python creates the arrays (their `zarr.json`), but the chunk bytes go through here. Reading a 20 MB chunk
through `array[a:b]` costs several times the Blosc decode itself (store access, the async codec pipeline, copies
into the output; benchmarks/RESULTS.md, B3). The arrays pkd-cache writes have one layout (docs/FORMAT.md): a
regular chunk grid, the default `c/<i>/<j>/...` chunk keys, and the codecs `bytes` (little endian) then `blosc`,
so a chunk is one Blosc frame: the Zarr backend's reader (store/backends/zarr_backend.py) fetches it through the checksum
check (store/integrity.py) and `decode_frame` decompresses it straight into the destination buffer in one call
that releases the GIL. An array in any other layout is refused when the store is opened (store/trust.py): another
codec chain could make the checksummed bytes mean other values.
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from .integrity import ChunkError


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


def blosc_sizes(data: bytes) -> tuple[int, int]:
    """(decoded bytes, frame bytes) from a Blosc frame's 16-byte header (both little-endian uint32, at offsets 4 and
    12): read before decoding, so a chunk never decodes into a buffer of another size."""
    if len(data) < 16:
        return -1, -1
    return int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")


def decode_frame(location, key: str, data: bytes, out: np.ndarray) -> np.ndarray:
    """A chunk file's Blosc frame (already checked against the manifest) into `out`: it must be one whole frame that
    decodes to exactly the buffer's size, checked from its header before anything is decoded."""
    import numcodecs.blosc

    nbytes, cbytes = blosc_sizes(data)
    if cbytes != len(data):
        raise ChunkError(location, key, "is not a whole Blosc frame: the store is damaged")
    if nbytes != out.nbytes:
        raise ChunkError(location, key, f"decodes to {nbytes:,} bytes where its array's chunk holds "
                                        f"{out.nbytes:,}: the store is damaged")
    try:
        numcodecs.blosc.decompress(data, out)
    except Exception as e:  # a truncated or altered chunk in a store without checksums
        raise ChunkError(location, key, f"cannot be decoded ({e}): the store is damaged") from e
    return out
