"""The Zarr v3 store (the default format, docs/FORMAT.md): its layout checks, its chunk reader and its writer.

zarr-python creates the arrays and writes the metadata; the chunk files are encoded, written, fetched and decoded
by pkd-cache itself (store/chunks.py), each checked against the manifest (store/integrity.py).
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from ...errors import PkdCacheError
from ..backend import GridSource, LayoutProblem, Shape
from ..chunks import blosc_params, chunk_key, decode_frame, encode_chunk
from ..format import StoreMeta, chunk_shape, compressor, now
from ..integrity import ChunkFiles, checksum
from ..location import Location
from ..sink import ChunkedWriter
from ..trust import chunk_count, chunk_keys, zarr_array_problem


class ChunkReader(GridSource):
    """Chunks of one Zarr array of a store, each fetched as one file, checked and decoded into a C-contiguous buffer
    of the chunk's full shape. No zarr here: `Store` has checked the array's `zarr.json` against the metadata
    (store/trust.py), so the layout is pkd-cache's own (default chunk keys, `bytes` little endian then `blosc`)."""

    def __init__(self, files: ChunkFiles, key: str, shape: Shape, chunks: Shape, dtype):
        self.files, self.key = files, key
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), np.dtype(dtype)

    def chunk_name(self, coords: Shape) -> str:
        """How messages name a chunk: its key inside the array (`c/3/5/0`)."""
        return "c/" + "/".join(map(str, coords))

    def file_key(self, coords: Shape) -> str:
        """The chunk's path in the store and in the checksum manifest (`train/cls/c/3/5/0`)."""
        return f"{self.key}/{self.chunk_name(coords)}"

    def read_into(self, coords: Shape, out: np.ndarray) -> np.ndarray:
        """Chunk `coords` into `out` (the full chunk shape). Every chunk must exist (pkd-cache writes them all),
        match the manifest, and decode to exactly the buffer's size."""
        key = self.file_key(coords)
        return decode_frame(self.files.location, key, self.files.read(key), out)


class StoreWriter(ChunkedWriter):
    """The Zarr store: `create_split` the layout, `write` chunk-aligned blocks, then `finish` (complete=True last).

    zarr-python writes the metadata; the chunks are encoded and written here (store/chunks.py), each with its
    CRC-32C recorded in the manifest that `finish` writes before the complete flag.
    """

    def __init__(self, location: Location, metadata: dict, resume: bool = False, attach: bool = False,
                 extend: bool = False):
        """`attach`: write chunks into a store another process (rank 0 of a multi-rank dump) created and will
        finish; its metadata is left alone. `extend`: add splits to the complete store whose metadata (updated
        with the extension's key) is `metadata`; it is written once, by `finish`."""
        import zarr  # here: the store package is imported by readers (`info`, `verify`), which need no zarr

        self._start(location, resume, attach, metadata if extend else None)
        if extend:
            self.metadata = metadata
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+")
        elif attach:
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+")
            self.metadata = dict(self.root.attrs)
        elif resume:
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+")
            self.metadata = self._resumed_metadata(dict(self.root.attrs), metadata)
        else:
            self.metadata = metadata  # mode "a": the folder already holds our lock, and nothing else (checked)
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="a")
        if not attach and not extend:
            self.root.attrs.update(self.metadata)
        self._arrays: dict[tuple[str, str], tuple] = {}

    def create_split(self, split: str, shapes: dict[str, tuple], split_meta: dict) -> None:
        """`shapes`: {array: (shape, dtype)} (format.split_arrays); chunked by the metadata's chunk_size."""
        n = next(iter(shapes.values()))[0][0]
        if self.extending:
            self._new_split_folder(split)
        g = self.root[split] if self.resumed and split in self.root else self.root.create_group(split)
        for name, (shape, dtype) in shapes.items():
            if self.resumed and name in g:  # created by the interrupted dump (a kill may have stopped it half way)
                array = g[name]
                if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
                    raise PkdCacheError(f"cannot resume {self.location}: {split}/{name} is {array.shape} "
                                        f"{array.dtype}, this dump needs {shape} {dtype}")
                self._arrays[split, name] = (array, blosc_params(array))
                continue
            array = g.create_array(name, shape=shape, chunks=chunk_shape(name, shape, self.metadata["chunk_size"]),
                                   dtype=dtype, fill_value=0, compressors=compressor(name, np.dtype(dtype).itemsize))
            self._arrays[split, name] = (array, blosc_params(array))
        self.metadata["splits"][split] = {"num_examples": n, **split_meta}

    def write(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Examples [start, start + len) of each array; `start` is a multiple of the chunk size. The chunk is
        recorded as durable once all its files are written."""
        files = {}
        for name, value in arrays.items():
            array, params = self._arrays[split, name]
            rows = array.chunks[0]
            if start % rows or (len(value) != rows and start + len(value) != array.shape[0]):
                raise ValueError(f"write of {split}/{name} at {start} (+{len(value)}) is not chunk-aligned")
            c = start // rows
            if len(value) < rows:  # the last chunk is stored at the full chunk shape, padded with the fill value
                value = np.concatenate([value, np.zeros((rows - len(value),) + value.shape[1:], value.dtype)])
            value = value.astype(array.dtype, copy=False)
            width = array.chunks[1] if value.ndim > 1 else None
            for j in range(0, value.shape[1], width) if width else [None]:
                block = value if j is None else value[:, j:j + width]
                coords = (c,) if j is None else (c, j // width) + (0,) * (value.ndim - 2)
                key = f"{split}/{name}/{chunk_key(array, coords)}"
                data = encode_chunk(block, params)
                self.location.write(key, data)
                files[key] = checksum(data)
        self._record(split, start // self.metadata["chunk_size"], files)

    def _write_complete(self) -> None:
        """The metadata, then (a separate, last write) the complete flag."""
        self.metadata.setdefault("completed_at", now())  # an extended store keeps its first completion time
        self.root.attrs.update({k: v for k, v in self.metadata.items() if k != "complete"})
        self.root.attrs["complete"] = True
        self.metadata["complete"] = True


class ZarrBackend:
    """A Zarr store opened for reading: each array's `zarr.json` checked against the metadata, its chunk files read
    by `ChunkReader`."""

    name = "zarr"
    meta_key = "zarr.json"  # the root group's; its `attributes` are the metadata
    order = 0  # tried first when a store is opened
    sink = StoreWriter

    def __init__(self, location: Location, meta: StoreMeta):
        self.location, self.meta = location, meta

    @staticmethod
    def metadata_in(doc) -> Optional[dict]:
        return doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None

    def chunks_of(self, split: str, name: str, shape: Shape, dtype: str) -> Shape:
        try:
            doc = json.loads(self.location.read(f"{split}/{name}/zarr.json"))
        except FileNotFoundError:
            raise LayoutProblem(f"{split}/{name}: array missing") from None
        except ValueError as e:
            raise LayoutProblem(f"{split}/{name}: zarr.json is not valid JSON ({e})") from None
        why = zarr_array_problem(doc, shape, dtype, self.meta.chunk_size, name)
        if why:
            raise LayoutProblem(f"{split}/{name}: array {why}")
        return tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])

    def file_keys(self, grids: dict[str, tuple[Shape, Shape]]):
        """One file per chunk of every array (`train/cls/c/3/5/0`)."""
        counts = {a: chunk_count(shape, chunks) for a, (shape, chunks) in grids.items()}
        return counts, lambda: (k for a, (shape, chunks) in grids.items() for k in chunk_keys(a, shape, chunks))

    def source(self, split: str, name: str, shape: Shape, dtype: str, chunks: Shape,
               files: ChunkFiles) -> ChunkReader:
        return ChunkReader(files, f"{split}/{name}", shape, chunks, dtype)


BACKEND = ZarrBackend
