"""Writing a store: create the arrays, fill them chunk by chunk, mark the store complete last."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from .. import __version__
from ..errors import PkdCacheError
from .format import FORMAT_NAME, FORMAT_VERSION, compressor


def is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("attributes", {}).get("format") == FORMAT_NAME
    except (OSError, ValueError):
        return False


def check_target(out: str, overwrite: bool) -> Path:
    """Refuse an existing `--out` unless `overwrite`; never delete something that is not a store."""
    path = Path(out).expanduser()
    if path.exists():
        if not overwrite:
            raise PkdCacheError(f"--out {out} already exists; pass --overwrite to replace it")
        if path.is_dir() and not is_store(path) and any(path.iterdir()):
            raise PkdCacheError(f"--out {out} exists and is not a pkd-cache store; refusing to delete it")
    return path


class StoreWriter:
    """`create` the layout, `write` chunk-aligned blocks of examples, then `finish` (sets complete=True last)."""

    def __init__(self, out: str, overwrite: bool, metadata: dict):
        path = check_target(out, overwrite)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.path = path
        self.root = zarr.open_group(str(path), mode="w-")
        self.metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False,
                         "package_version": __version__, "created_at": _now(), **metadata, "splits": {}}
        self.root.attrs.update(self.metadata)

    def create_split(self, split: str, n: int, seq_len: int, num_labels: int, layers: int, hidden: int,
                     cls_dtype: str, label_dtype: str, chunk_size: int, split_meta: dict) -> None:
        g = self.root.create_group(split)
        shapes = {"input_ids": ((n, seq_len), "int32"), "attention_mask": ((n, seq_len), "uint8"),
                  "token_type_ids": ((n, seq_len), "uint8"), "labels": ((n,), label_dtype),
                  "logits": ((n, num_labels), "float32"), "cls": ((n, layers + 1, hidden), cls_dtype)}
        if cls_dtype == "int8":
            shapes["cls_scale"] = ((n, layers + 1), "float32")
        for name, (shape, dtype) in shapes.items():
            chunks = (min(chunk_size, n),) + shape[1:]
            if name == "cls":  # one chunk per layer: a student reads only its mapped layers (docs/FORMAT.md)
                chunks = (chunks[0], 1, hidden)
            g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                           compressors=compressor(name, np.dtype(dtype).itemsize))
        self.metadata["splits"][split] = {"num_examples": n, **split_meta}

    def write(self, split: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        g = self.root[split]
        for name, value in arrays.items():
            g[name][start:start + len(value)] = value

    def finish(self) -> None:
        """Record the metadata, then (a separate, last write) the complete flag."""
        self.metadata["completed_at"] = _now()
        self.root.attrs.update({k: v for k, v in self.metadata.items() if k != "complete"})
        self.root.attrs["complete"] = True
        self.metadata["complete"] = True


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
