"""The Arrow flavour of a store (`dump --format arrow`): the same content and metadata as Arrow IPC shards.

    sst2.arrow/
      pkd_cache.json            the metadata (the Zarr store's root attributes); `complete` true only once finished
      checksums.json            {"algorithm": "crc32c", "chunks": {"train/00000.arrow": [nbytes, crc32c], ...}}
      train/00000.arrow ...     IPC stream files of `chunk_size` rows each, LZ4-compressed buffers
      validation/00000.arrow

Columns: `input_ids`, `attention_mask`, `token_type_ids` (fixed-size lists of S), `labels`, `logits` (fixed-size
list of C), and one column per CLS layer, `cls_0` (embeddings) .. `cls_L` (fixed-size lists of H), plus
`cls_scale` (fixed-size list of L+1) for int8. One column per layer lets a student decompress only its mapped
layers, as the Zarr layout's per-layer chunks do. The shards load with `datasets.load_dataset("arrow", ...)`.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from ..errors import PkdCacheError
from .chunks import ArrayChunks, ChunkError, check_recorded, crc32c, write_manifest
from .format import ARROW_META
from .location import Location
from .writer import ChunkedWriter


def shard_key(split: str, chunk: int) -> str:
    return f"{split}/{chunk:05d}.arrow"


def columns_of(name: str, width: int) -> list[str]:
    """The Arrow columns holding array `name` (`cls` is one column per layer)."""
    return [f"cls_{i}" for i in range(width)] if name == "cls" else [name]


def to_column(values: np.ndarray):
    """(rows, ...) numpy -> an Arrow array: nested fixed-size lists for the trailing dimensions."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def arrow_type(shape: tuple[int, ...], dtype):
    """The Arrow type a column of `shape`-sized rows of `dtype` has in a shard (nested fixed-size lists)."""
    import pyarrow as pa

    t = pa.from_numpy_dtype(np.dtype(dtype))
    for size in reversed(shape):
        t = pa.list_(t, size)
    return t


def from_column(column, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An Arrow (chunked) column of fixed-size lists -> numpy of `(rows,) + shape`."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column
    for _ in shape:
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape((len(column),) + shape)


class ArrowStoreWriter(ChunkedWriter):
    """Same interface as the Zarr `StoreWriter`: `create_split`, `write` (one shard per chunk), `finish`."""

    def __init__(self, location: Location, metadata: dict, resume: bool = False):
        self._start(location, resume)
        self.metadata = self._resumed_metadata(json.loads(location.read(ARROW_META)), metadata) if resume \
            else metadata
        self.shapes: dict[str, dict] = {}
        self._write_meta()

    def create_split(self, split: str, shapes: dict[str, tuple], split_meta: dict) -> None:
        self.shapes[split] = shapes
        self.metadata["splits"][split] = {"num_examples": next(iter(shapes.values()))[0][0], **split_meta}

    def write(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        rows = self.metadata["chunk_size"]
        if start % rows:
            raise ValueError(f"write of {split} at {start} is not chunk-aligned")
        columns = {}
        for name, value in arrays.items():
            shape, dtype = self.shapes[split][name]
            value = value.astype(dtype, copy=False)
            if name == "cls":
                columns.update({f"cls_{i}": to_column(value[:, i]) for i in range(value.shape[1])})
            else:
                columns[name] = to_column(value)
        table = pa.table(columns)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
            w.write_table(table)
        data = sink.getvalue().to_pybytes()
        key = shard_key(split, start // rows)
        self.location.write(key, data)
        self._record(split, start // rows, {key: [len(data), crc32c(data)]})

    def finish(self) -> None:
        write_manifest(self.location, self.checksums, self.metadata)
        self.metadata["complete"] = True  # one atomic write: the metadata and the flag together, last
        self._write_meta()
        self._finished()

    def _write_meta(self) -> None:
        self.location.write(ARROW_META, json.dumps(self.metadata, indent=1).encode())


class ArrowArray:
    """One array of one split of an Arrow store, with the shape, dtype and chunks a Zarr array would have."""

    def __init__(self, shards: "ShardCache", split: str, name: str, shape: tuple, dtype, rows: int):
        self.shards, self.split, self.name = shards, split, name
        self.shape, self.dtype, self.fill_value = tuple(shape), np.dtype(dtype), 0
        self.chunks = (min(rows, shape[0]), 1, shape[2]) if name == "cls" else (min(rows, shape[0]),) + self.shape[1:]
        self.path = f"{split}/{name}"


class ArrowChunkReader(ArrayChunks):
    """The `ChunkReader` interface over shards: chunk (c, j, 0) of `cls` is column `cls_j` of shard c."""

    def chunk_name(self, coords: tuple[int, ...]) -> str:
        column = f"cls_{coords[1]}" if self.array.name == "cls" else self.array.name
        return f"{shard_key(self.array.split, coords[0])}:{column}"

    def file_key(self, coords: tuple[int, ...]) -> str:
        return shard_key(self.array.split, coords[0])

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        a = self.array
        column = f"cls_{coords[1]}" if a.name == "cls" else a.name
        table = a.shards.column(a.split, coords[0], column)
        shape = (a.shape[2],) if a.name == "cls" else a.shape[1:]
        rows = min(a.chunks[0], a.shape[0] - coords[0] * a.chunks[0])
        want = arrow_type(shape, a.dtype)
        if table.num_rows != rows or table.column(0).type != want:
            raise ChunkError(a.shards.location, self.file_key(coords), f"column {column} holds {table.num_rows} rows "
                                                                       f"of {table.column(0).type}, the metadata "
                                                                       f"says {rows} of {want}")
        values = from_column(table.column(0), shape, a.dtype)
        view = out.reshape((out.shape[0],) + shape)
        view[:len(values)] = values
        view[len(values):] = 0
        return out


class ShardCache:
    """Shard files fetched (and checked against their checksum) once, then columns decoded on demand."""

    def __init__(self, location: Location, checksums: Optional[dict], capacity: int = 16):
        self.location, self.checksums, self.capacity = location, checksums, capacity
        self.buffers: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def column(self, split: str, chunk: int, column: str):
        import pyarrow as pa

        buf = self._buffer(shard_key(split, chunk))
        try:
            reader = pa.ipc.open_stream(buf)
            index = reader.schema.get_field_index(column)
            if index < 0:
                raise ChunkError(self.location, shard_key(split, chunk), f"has no column {column}")
            return pa.ipc.open_stream(buf, options=pa.ipc.IpcReadOptions(included_fields=[index])).read_all()
        except pa.ArrowException as e:
            raise ChunkError(self.location, shard_key(split, chunk), f"cannot be decoded ({e}): the store is "
                                                                     f"damaged") from e

    def _buffer(self, key: str):
        import pyarrow as pa

        with self.lock:
            if key in self.buffers:
                self.buffers.move_to_end(key)
                return self.buffers[key]
        try:
            data = self.location.read(key)
        except FileNotFoundError:
            raise ChunkError(self.location, key, "is missing") from None
        check_recorded(self.location, key, data, self.checksums)
        buf = pa.py_buffer(data)
        with self.lock:
            self.buffers[key] = buf
            while len(self.buffers) > self.capacity:
                self.buffers.popitem(last=False)
        return buf


class ArrowBackend:
    """What `Store` needs from an Arrow store: its arrays and their chunk readers."""

    def __init__(self, location: Location, meta: dict, checksums: Optional[dict]):
        from .format import expected_arrays

        self.expected = expected_arrays(meta)
        self.rows = int(meta.get("chunk_size") or 1024)
        self.shards = ShardCache(location, checksums)

    def array(self, split: str, name: str) -> ArrowArray:
        try:
            shape, dtype = self.expected[split][name]
        except KeyError:
            raise PkdCacheError(f"split {split} has no array {name}") from None
        return ArrowArray(self.shards, split, name, shape, dtype, self.rows)

    def chunk_reader(self, split: str, name: str) -> ArrowChunkReader:
        return ArrowChunkReader(self.array(split, name))
