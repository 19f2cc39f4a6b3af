"""Writing a store: refuse what must not be replaced, then the chosen backend's writer (store/registry.py) creates
the arrays, fills them chunk by chunk, records checksums and marks the store complete last."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..errors import PkdCacheError
from ..version import __version__
from .format import JOURNAL, new_metadata
from .journal import WriterLock
from .location import Location
from .registry import backend_named, read_metadata
from .worker import Consumer

if TYPE_CHECKING:
    import numpy as np

    from .backend import ChunkSink


def is_store(location: Location) -> bool:
    return read_metadata(location) is not None


def check_target(out: str, overwrite: bool, storage_options: Optional[dict] = None) -> Location:
    """Refuse an existing `--out` unless `overwrite`; never delete something that is not a store. An `--out`
    that another dump is writing (its lock is live) is refused naming that dump, whatever state it is in."""
    location = Location(out, storage_options)
    location.check_writable()
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


def attach_writer(out: str, storage_options: Optional[dict] = None) -> ChunkSink:
    """A writer of chunks into the (Zarr) store rank 0 of a multi-rank dump opened (`open_writer`) and will
    finish."""
    return backend_named("zarr").sink(Location(out, storage_options), {}, attach=True)


def open_writer(out: str, overwrite: bool, metadata: dict, store_format: str = "zarr",
                storage_options: Optional[dict] = None, resume: bool = False, extend: bool = False) -> ChunkSink:
    """A writer for a new store at `out` (an existing store there is replaced only with `overwrite`), or with
    `resume` for the unfinished store there: its durable chunks are kept and skipped. With `extend`, a writer that
    adds splits to the complete store there, whose metadata (with the extension's key) is `metadata`."""
    sink = backend_named(store_format).sink
    if extend:
        return sink(Location(out, storage_options), metadata, extend=True)
    location = Location(out, storage_options) if resume else check_target(out, overwrite, storage_options)
    lock = WriterLock(location)
    if not resume and location.exists():
        lock.acquire()  # not while another dump is writing it
        lock.release()
        location.remove_all()
    return sink(location, new_metadata(metadata, store_format, __version__), resume)


class BackgroundWriter:
    """Compresses and writes chunks on a thread while the teacher computes the next ones.

    The queue is bounded (`depth` chunks), so memory stays flat: a slow disk makes the teacher wait rather than
    pile up outputs. A write error is re-raised in the caller at the next `put` or at `close`.
    """

    def __init__(self, writer: ChunkSink, depth: int = 2):
        self.writer = writer
        self.worker = Consumer(lambda item: self.writer.write(*item), depth, "pkd-cache-writer")

    def put(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        self.worker.put((split, start, arrays))

    def close(self) -> None:
        """Wait until everything queued is written; re-raise a write error."""
        self.worker.close()
