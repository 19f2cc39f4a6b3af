"""Writing a store: create the arrays, fill them chunk by chunk, record checksums, mark the store complete last."""
from __future__ import annotations

import datetime as dt
import json
from typing import Optional

import numpy as np

from ..errors import PkdCacheError
from ..version import __version__
from .chunks import blosc_params, chunk_key, crc32c, encode_chunk, write_manifest
from .format import FORMAT_NAME, FORMAT_VERSION, compressor, read_metadata
from .journal import FOLDER as JOURNAL, WriterLock, durable_chunks, record_chunk, remove_partial_files
from .location import Location


def is_store(location: Location) -> bool:
    return read_metadata(location) is not None


def check_target(out: str, overwrite: bool, storage_options: Optional[dict] = None) -> Location:
    """Refuse an existing `--out` unless `overwrite`; never delete something that is not a store. An `--out`
    that another dump is writing (its lock is live) is refused naming that dump, whatever state it is in."""
    location = Location(out, storage_options)
    location._writable()
    if location.exists():
        WriterLock(location).check()
        if not overwrite:
            raise PkdCacheError(f"--out {out} already exists; pass --overwrite to replace it")
        if not is_store(location) and not _empty_dir(location):
            raise PkdCacheError(f"--out {out} exists and is not a pkd-cache store; refusing to delete it")
    return location


def _empty_dir(location: Location) -> bool:
    if location.url:
        try:
            return not location.fs.ls(location.root)
        except FileNotFoundError:
            return True
    # only a dump's journal (a dump killed before it wrote the store's metadata) counts as empty: ours to replace
    return location.local.is_dir() and all(p.name == JOURNAL for p in location.local.iterdir())


def attach_writer(out: str, storage_options: Optional[dict] = None) -> "StoreWriter":
    """A writer of chunks into the store rank 0 of a multi-rank dump opened (`open_writer`) and will finish."""
    return StoreWriter(Location(out, storage_options), {}, attach=True)


def open_writer(out: str, overwrite: bool, metadata: dict, store_format: str = "zarr",
                storage_options: Optional[dict] = None, resume: bool = False):
    """A writer for a new store at `out` (an existing store there is replaced only with `overwrite`), or with
    `resume` for the unfinished store there: its durable chunks are kept and skipped."""
    location = Location(out, storage_options) if resume else check_target(out, overwrite, storage_options)
    lock = WriterLock(location)
    if not resume and location.exists():
        lock.acquire()  # not while another dump is writing it
        lock.release()
        location.remove_all()
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False,
            "package_version": __version__, "created_at": _now(), "store_format": store_format, **metadata,
            "splits": {}}
    if store_format == "arrow":
        from .arrow import ArrowStoreWriter

        return ArrowStoreWriter(location, full, resume)
    return StoreWriter(location, full, resume)


class ChunkedWriter:
    """What both store flavours share: the single-writer lock, each chunk's checksums recorded once its files are
    in place (store/journal.py), the chunks a resumed dump finds durable, and the manifest at the end."""

    def _start(self, location: Location, resume: bool, attach: bool = False) -> None:
        self.location = location
        self.lock = WriterLock(location)
        if not attach:  # an attached writer (another rank of one dump) works under rank 0's lock
            self.lock.acquire()
        self.checksums: dict[str, list[int]] = {}
        self.durable: dict[str, set[int]] = {}
        self.resumed = resume or attach
        if resume and not attach:
            remove_partial_files(location)  # files a killed writer did not finish renaming into place

    def _resumed_metadata(self, old: dict, new: dict) -> dict:
        """The first dump's metadata, with this resumption recorded."""
        meta = {**old, "resumptions": [*old.get("resumptions", []), _now()]}
        meta["settings"] = new.get("settings", old.get("settings"))
        return meta

    def load_durable(self, split: str) -> set[int]:
        """Chunks of `split` that an earlier, interrupted dump made durable (empty for a fresh store)."""
        records = durable_chunks(self.location, split) if self.resumed else {}
        for record in records.values():
            self.checksums.update(record)
        self.durable[split] = set(records)
        return self.durable[split]

    def _record(self, split: str, chunk: int, files: dict[str, list[int]]) -> None:
        self.checksums.update(files)
        record_chunk(self.location, split, chunk, files)
        self.durable.setdefault(split, set()).add(chunk)

    def durable_examples(self) -> int:
        rows = self.metadata["chunk_size"]
        return sum(min(rows, self.metadata["splits"][s]["num_examples"] - c * rows)
                   for s, chunks in self.durable.items() for c in chunks)

    def close(self) -> None:
        """Release the lock (after `finish`, or when the dump stops early: the store stays resumable)."""
        self.lock.release()

    def _finished(self) -> None:
        self.close()
        self.location.remove(JOURNAL)  # progress folded into checksums.json, lock released: the store is complete


class StoreWriter(ChunkedWriter):
    """The Zarr store: `create_split` the layout, `write` chunk-aligned blocks, then `finish` (complete=True last).

    zarr-python writes the metadata; the chunks are encoded and written here (store/chunks.py), each with its
    CRC-32C recorded in the manifest that `finish` writes before the complete flag.
    """

    def __init__(self, location: Location, metadata: dict, resume: bool = False, attach: bool = False):
        """`attach`: write chunks into a store another process (rank 0 of a multi-rank dump) created and will
        finish; its metadata is left alone."""
        import zarr  # here: the store package is imported by readers (`info`, `verify`), which need no zarr

        self._start(location, resume, attach)
        if attach:
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+")
            self.metadata = dict(self.root.attrs)
        elif resume:
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="r+")
            self.metadata = self._resumed_metadata(dict(self.root.attrs), metadata)
        else:
            self.metadata = metadata  # mode "a": the folder already holds our lock, and nothing else (checked)
            self.root = zarr.open_group(store=self.location.zarr_store(read_only=False), mode="a")
        if not attach:
            self.root.attrs.update(self.metadata)
        self._arrays: dict[tuple[str, str], tuple] = {}

    def create_split(self, split: str, shapes: dict[str, tuple], split_meta: dict) -> None:
        """`shapes`: {array: (shape, dtype)} (format.split_arrays); chunked by the metadata's chunk_size."""
        n = next(iter(shapes.values()))[0][0]
        g = self.root[split] if self.resumed and split in self.root else self.root.create_group(split)
        for name, (shape, dtype) in shapes.items():
            if self.resumed and name in g:  # created by the interrupted dump (a kill may have stopped it half way)
                array = g[name]
                if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
                    raise PkdCacheError(f"cannot resume {self.location}: {split}/{name} is {array.shape} "
                                        f"{array.dtype}, this dump needs {shape} {dtype}")
                self._arrays[split, name] = (array, blosc_params(array))
                continue
            chunks = (min(self.metadata["chunk_size"], n),) + shape[1:]
            if name == "cls":  # one chunk per layer: a student reads only its mapped layers (docs/FORMAT.md)
                chunks = (chunks[0], 1, shape[2])
            array = g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                   compressors=compressor(name, np.dtype(dtype).itemsize))
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
                files[key] = [len(data), crc32c(data)]
        self._record(split, start // self.metadata["chunk_size"], files)

    def finish(self) -> None:
        """Write the checksum manifest and the metadata, then (a separate, last write) the complete flag."""
        write_manifest(self.location, self.checksums, self.metadata)
        self.metadata["completed_at"] = _now()
        self.root.attrs.update({k: v for k, v in self.metadata.items() if k != "complete"})
        self.root.attrs["complete"] = True
        self.metadata["complete"] = True
        self._finished()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class BackgroundWriter:
    """Compresses and writes chunks on a thread while the teacher computes the next ones.

    The queue is bounded (`depth` chunks), so memory stays flat: a slow disk makes the teacher wait rather than
    pile up outputs. A write error is re-raised in the caller at the next `put` or at `close`.
    """

    def __init__(self, writer: StoreWriter, depth: int = 2):
        import queue
        import threading

        self.writer, self.error = writer, None
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="pkd-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:  # after a failure, drain without writing so that `put` never blocks forever
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def put(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        self._raise()
        self.queue.put((split, start, arrays))

    def close(self) -> None:
        """Wait until everything queued is written; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
