"""The Arrow flavour of a store (`dump --format arrow`): the same content and metadata as Arrow IPC shards.

    sst2.arrow/
      pkd_cache.json            the metadata (the Zarr store's root attributes); `complete` true only once finished
      checksums.json            {"algorithm": "crc32c", "chunks": {"train/00000.arrow": [nbytes, crc32c], ...}}
      train/00000.arrow ...     IPC stream files of `chunk_size` rows each, LZ4-compressed buffers
      validation/00000.arrow

Columns: `input_ids`, `attention_mask`, `token_type_ids` (fixed-size lists of S), `labels`, `logits` (fixed-size
list of C), and one column per CLS layer, `cls_0` (embeddings) .. `cls_L` (fixed-size lists of H), plus
`cls_scale` (fixed-size list of L+1) for int8. One column per layer lets a student decompress only its mapped
layers, as the Zarr layout's per-layer chunks do (format.layer_part names them). The shards load with
`datasets.load_dataset("arrow", ...)`.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from ..backend import GridSource, LayoutProblem, Shape
from ..format import StoreMeta, chunk_shape, is_layered, layer_part, now, part_shape
from ..integrity import ChunkError, ChunkFiles, checksum
from ..location import Location
from ..sink import ChunkedWriter
from ..trust import MAX_CHUNK_BYTES

ARROW_META = "pkd_cache.json"  # the metadata (a Zarr store's is the attributes of its zarr.json)


def shard_key(split: str, chunk: int) -> str:
    return f"{split}/{chunk:05d}.arrow"


def to_column(values: np.ndarray):
    """(rows, ...) numpy -> an Arrow array: nested fixed-size lists for the trailing dimensions."""
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def arrow_type(shape: Shape, dtype):
    """The Arrow type a column of `shape`-sized rows of `dtype` has in a shard (nested fixed-size lists)."""
    import pyarrow as pa

    t = pa.from_numpy_dtype(np.dtype(dtype))
    for size in reversed(shape):
        t = pa.list_(t, size)
    return t


def from_column(column, shape: Shape, dtype) -> np.ndarray:
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

    meta_key = ARROW_META  # the metadata file it writes

    def __init__(self, location: Location, metadata: dict, resume: bool = False, extend: bool = False):
        self._start(location, resume, extend=metadata if extend else None)
        self.metadata = self._resumed_metadata(json.loads(location.read(self.meta_key)), metadata) if resume \
            else metadata
        self.shapes: dict[str, dict] = {}
        if not extend:  # an extended store's metadata is rewritten once, by `finish`
            self._write_meta()

    def create_split(self, split: str, shapes: dict[str, tuple], split_meta: dict) -> None:
        if self.extending:
            self._new_split_folder(split)
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
            if is_layered(name):
                columns.update({layer_part(name, i): to_column(value[:, i]) for i in range(value.shape[1])})
            else:
                columns[name] = to_column(value)
        table = pa.table(columns)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
            w.write_table(table)
        data = sink.getvalue().to_pybytes()
        key = shard_key(split, start // rows)
        self.location.write(key, data)
        self._record(split, start // rows, {key: checksum(data)})

    def _write_complete(self) -> None:
        self.metadata.setdefault("completed_at", now())  # as the Zarr writer: gc orders unused stores by it
        self.metadata["complete"] = True  # one atomic write: the metadata and the flag together, last
        self._write_meta()

    def _write_meta(self) -> None:
        self.location.write(self.meta_key, json.dumps(self.metadata, indent=1).encode())


class ArrowChunkReader(GridSource):
    """One array of one split over its shards: chunk c of a plain array is its column in shard c; chunk (c, j, 0)
    of a layered array (`cls`) is the column of layer j."""

    def __init__(self, shards: "ShardCache", split: str, name: str, shape: Shape, dtype, chunks: Shape):
        self.shards, self.split, self.name = shards, split, name
        self.shape, self.dtype, self.chunks = tuple(shape), np.dtype(dtype), tuple(chunks)

    def _column(self, coords: Shape) -> str:
        return layer_part(self.name, coords[1]) if is_layered(self.name) else self.name

    def chunk_name(self, coords: Shape) -> str:
        return f"{shard_key(self.split, coords[0])}:{self._column(coords)}"

    def file_key(self, coords: Shape) -> str:
        return shard_key(self.split, coords[0])

    def read_into(self, coords: Shape, out: np.ndarray) -> np.ndarray:
        column = self._column(coords)
        table = self.shards.column(self.split, coords[0], column)
        shape = part_shape(self.name, self.shape)
        rows = self.rows_in(coords)
        want = arrow_type(shape, self.dtype)
        if table.num_rows != rows or table.column(0).type != want:
            raise ChunkError(self.shards.files.location, self.file_key(coords),
                             f"column {column} holds {table.num_rows} rows of {table.column(0).type}, the metadata "
                             f"says {rows} of {want}")
        values = from_column(table.column(0), shape, self.dtype)
        view = out.reshape((out.shape[0],) + shape)
        view[:len(values)] = values
        view[len(values):] = 0
        return out


class ShardCache:
    """Shard files fetched (and checked against their checksum) once, then columns decoded on demand."""

    def __init__(self, files: ChunkFiles, capacity: int = 16):
        self.files, self.capacity = files, capacity
        self.buffers: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def column(self, split: str, chunk: int, column: str):
        import pyarrow as pa

        key = shard_key(split, chunk)
        buf = self._buffer(key)
        try:
            reader = pa.ipc.open_stream(buf)
            index = reader.schema.get_field_index(column)
            if index < 0:
                raise ChunkError(self.files.location, key, f"has no column {column}")
            return pa.ipc.open_stream(buf, options=pa.ipc.IpcReadOptions(included_fields=[index])).read_all()
        except pa.ArrowException as e:
            raise ChunkError(self.files.location, key, f"cannot be decoded ({e}): the store is damaged") from e

    def _buffer(self, key: str):
        import pyarrow as pa

        with self.lock:
            if key in self.buffers:
                self.buffers.move_to_end(key)
                return self.buffers[key]
        buf = pa.py_buffer(self.files.read(key))
        with self.lock:
            self.buffers[key] = buf
            while len(self.buffers) > self.capacity:
                self.buffers.popitem(last=False)
        return buf


class ArrowBackend:
    """An Arrow store opened for reading: chunk shapes implied by the metadata, one shard file per chunk of rows
    holding every array of the split."""

    name = "arrow"
    meta_key = ARROW_META
    order = 1  # after Zarr, when a store is opened
    sink = ArrowStoreWriter

    def __init__(self, location: Location, meta: StoreMeta):
        self.location, self.meta = location, meta
        self._shards: Optional[ShardCache] = None

    @staticmethod
    def metadata_in(doc) -> Optional[dict]:
        return doc if isinstance(doc, dict) else None

    def chunks_of(self, split: str, name: str, shape: Shape, dtype: str) -> Shape:
        chunks = chunk_shape(name, shape, self.meta.chunk_size)
        if math.prod(chunks) * np.dtype(dtype).itemsize > MAX_CHUNK_BYTES:
            raise LayoutProblem(f"{split}/{name}: chunks of {chunks} {dtype} exceed {MAX_CHUNK_BYTES:,} bytes")
        return chunks

    def file_keys(self, grids: dict[str, tuple[Shape, Shape]]):
        """One shard per chunk of rows of each split (`train/00000.arrow`)."""
        rows = self.meta.chunk_size
        counts = {s: -(-v.num_examples // rows) for s, v in self.meta.splits.items()}
        return counts, lambda: (shard_key(s, c) for s, n in counts.items() for c in range(n))

    def source(self, split: str, name: str, shape: Shape, dtype: str, chunks: Shape,
               files: ChunkFiles) -> ArrowChunkReader:
        if self._shards is None or self._shards.files is not files:  # one cache for every array of the store
            self._shards = ShardCache(files)
        return ArrowChunkReader(self._shards, split, name, shape, dtype, chunks)


BACKEND = ArrowBackend
