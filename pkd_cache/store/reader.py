"""Reading a store: its metadata, and shuffled or ordered batches of torch tensors."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from ..errors import PkdCacheError
from .chunks import ChunkError, ChunkReader
from .format import ARRAYS, ARROW_META, FORMAT_NAME, FORMAT_VERSION, expected_arrays
from .location import Location
from .quantize import dequantize_int8
from .trust import (MAX_CHUNK_BYTES, NO_MANIFEST, chunk_count, chunk_keys, load_manifest, manifest_problems, meta_problems,
                    value_problem, zarr_array_problem)

if TYPE_CHECKING:  # only `batches` makes tensors (stream.to_batch imports torch): `info` and `verify` never do
    import torch


class Store:
    """A pkd-cache store opened read-only. `info()` is the metadata; `batches()` streams examples.

    Opening a store for reading (`require_complete`) checks its metadata against every array and the checksum
    manifest before anything is allocated (store/trust.py); every chunk read is then checked against the manifest
    and its values checked. `allow_no_checksums` reads a store that has no manifest (pkd-cache 0.1.0 wrote such
    stores), without the checksum check.
    """

    def __init__(self, path: str, require_complete: bool = True, storage_options: Optional[dict] = None,
                 allow_no_checksums: bool = False):
        self.path = str(path)
        self.location = Location(self.path, storage_options)
        self.root = None  # the Zarr group (None for an Arrow store)
        if self.location.exists("zarr.json"):
            try:
                doc = json.loads(self.location.read("zarr.json"))
                attrs = doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None
            except ValueError as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store (zarr.json is not valid JSON: {e})") from e
            self._zarr = True
        elif self.location.exists(ARROW_META):
            try:
                attrs = json.loads(self.location.read(ARROW_META))
            except ValueError as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store ({ARROW_META} is not valid JSON: {e})") from e
            self._zarr = False
        else:
            what = "is not a pkd-cache store (no zarr.json or pkd_cache.json)" if self.location.exists() \
                else "does not exist"
            raise PkdCacheError(f"store {path} {what}")
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise PkdCacheError(f"{path} is not a pkd-cache store (no 'format: {FORMAT_NAME}' attribute)")
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise PkdCacheError(f"store {path} has format version {version}; this pkd-cache reads up to "
                                f"{FORMAT_VERSION}: upgrade pkd-cache")
        if require_complete and not attrs.get("complete"):
            raise PkdCacheError(f"store {path} is not complete (its dump did not finish); re-run the dump")
        self.meta = attrs
        self.allow_no_checksums = allow_no_checksums
        self._manifest: Optional[tuple] = None  # (checksums or None,) once loaded
        self._arrow = None
        self._chunks: dict[tuple[str, str], tuple[int, ...]] = {}  # chunk shapes, once the layout is checked
        self._values_checked: set[str] = set()  # chunks whose values passed (CheckedChunks)
        self._expected: Optional[dict] = None  # {split: {array: (shape, dtype)}} once the metadata is checked
        if require_complete:
            if self.checksums is None and not allow_no_checksums:
                raise PkdCacheError(f"store {path} {NO_MANIFEST}")
            problems = self.layout_problems(check_files=True)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise PkdCacheError(f"store {path} is damaged or was altered: {problems[0]}{more}; run "
                                    f"`pkd-cache verify {path}`")

    def layout_problems(self, check_files: bool = False) -> list[str]:
        """What disagrees between the metadata, each array's `zarr.json` and the manifest (store/trust.py), with
        `check_files` also each chunk file's presence and size (local stores: one stat per chunk). Empty when the
        store is sound enough to read chunk by chunk; nothing here allocates in proportion to a claimed size."""
        problems = meta_problems(self.meta)
        if problems:
            return problems
        grids: dict[str, tuple] = {}  # "train/cls" -> (shape, chunk shape)
        for split, arrays in expected_arrays(self.meta).items():
            for name, (shape, dtype) in arrays.items():
                chunks = self._array_chunks(split, name, shape, dtype, problems)
                if chunks is not None:
                    grids[f"{split}/{name}"] = (shape, chunks)
        counts = {a: chunk_count(shape, chunks) for a, (shape, chunks) in grids.items()}
        if problems:
            return problems
        manifest = self.checksums
        if self._zarr:
            keys = lambda: (k for a, (shape, chunks) in grids.items() for k in chunk_keys(a, shape, chunks))  # noqa: E731
        else:  # one shard file per chunk of rows holds every array of the split
            from .arrow import shard_key

            counts = {s: -(-v["num_examples"] // self.meta["chunk_size"]) for s, v in self.meta["splits"].items()}
            keys = lambda: (shard_key(s, c) for s, n in counts.items() for c in range(n))  # noqa: E731
        if manifest is None:
            if not self.allow_no_checksums:
                return [f"checksums: the store {NO_MANIFEST}"]
            files = self.location.file_count()  # without a manifest, the files themselves bound the chunk count
            if sum(counts.values()) > files:
                return [f"the layout needs {sum(counts.values()):,} chunks but the store holds {files:,} files (the "
                        f"metadata promises more data than the store holds)"]
            if check_files and not self.location.url:
                missing = [k for k in keys() if not (self.location.local / k).is_file()]
                if missing:
                    problems.append(f"{len(missing)} chunk(s) of the layout are missing, e.g. {missing[0]}")
            return problems
        problems += manifest_problems(counts, keys, manifest)
        if not problems and check_files and not self.location.url:
            problems += self._file_problems(manifest)
        return problems

    def _array_chunks(self, split: str, name: str, shape, dtype, problems: list) -> Optional[tuple[int, ...]]:
        """The chunk shape of an array once its `zarr.json` is checked against the metadata (Arrow: implied)."""
        if not self._zarr:
            rows = min(self.meta["chunk_size"], shape[0])
            chunks = (rows, 1, shape[2]) if name == "cls" else (rows,) + tuple(shape[1:])
            if math.prod(chunks) * np.dtype(dtype).itemsize > MAX_CHUNK_BYTES:
                problems.append(f"{split}/{name}: chunks of {chunks} {dtype} exceed {MAX_CHUNK_BYTES:,} bytes")
                return None
        else:
            try:
                doc = json.loads(self.location.read(f"{split}/{name}/zarr.json"))
            except FileNotFoundError:
                problems.append(f"{split}/{name}: array missing")
                return None
            except ValueError as e:
                problems.append(f"{split}/{name}: zarr.json is not valid JSON ({e})")
                return None
            why = zarr_array_problem(doc, shape, dtype, self.meta["chunk_size"], name)
            if why:
                problems.append(f"{split}/{name}: array {why}")
                return None
            chunks = tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
        self._chunks[split, name] = chunks
        return chunks

    def _file_problems(self, manifest: dict) -> list[str]:
        """Every chunk the manifest records is a file of the recorded size (a stat each: cheap, and it finds a
        half-written store before training starts rather than mid-epoch)."""
        missing, wrong = [], []
        for key, (nbytes, _) in manifest.items():
            try:
                size = (self.location.local / key).stat().st_size
            except FileNotFoundError:
                missing.append(key)
                continue
            if size != nbytes:
                wrong.append(f"{key} has {size:,} bytes, the manifest records {nbytes:,}")
        out = [f"{len(missing)} chunk(s) the manifest records are missing, e.g. {missing[0]}"] if missing else []
        return out + ([f"{len(wrong)} chunk(s) differ in size from the manifest, e.g. {wrong[0]}"] if wrong else [])

    @property
    def store_format(self) -> str:
        return "zarr" if self._zarr else "arrow"

    @property
    def checksums(self) -> Optional[dict]:
        """The manifest's {chunk key: [nbytes, crc32c]}, or None for a store that has none (and records none)."""
        if self._manifest is None:
            self._manifest = (load_manifest(self.location, self.meta),)
        return self._manifest[0]

    def size_bytes(self) -> int:
        """Bytes of the store: the files on disk for a local store; for a remote one, the chunks its manifest
        records (one request instead of a listing of every chunk)."""
        if self.location.url and self.checksums is not None:
            return sum(n for n, _ in self.checksums.values())
        return self.location.size()

    def chunk_reader(self, split: str, name: str) -> "CheckedChunks":
        """Chunk by chunk reads of one array: each chunk checked against the manifest, its decoded size and its
        values (store/trust.py), whatever the backend."""
        shape, dtype = self._spec(split, name)
        if (split, name) not in self._chunks:
            problems: list[str] = []
            if self._array_chunks(split, name, shape, dtype, problems) is None:
                raise PkdCacheError(f"store {self.path}: {problems[0]}; run `pkd-cache verify {self.path}`")
        if not self._zarr:
            reader = self._arrow_backend().chunk_reader(split, name)
        else:
            reader = ChunkReader(self.location, f"{split}/{name}", shape, self._chunks[split, name], dtype,
                                 self.checksums)
        # with a manifest, a chunk that passed once is passed again: every later read of it is checked against the
        # same size and CRC, so its values are the ones already checked
        return CheckedChunks(reader, name, self.meta, self.location,
                             self._values_checked if self.checksums is not None else None)

    def _spec(self, split: str, name: str) -> tuple[tuple[int, ...], str]:
        self._split_meta(split)
        if self._expected is None:  # once per open store: every chunk reader of every epoch asks
            problems = meta_problems(self.meta)
            if problems:
                raise PkdCacheError(f"store {self.path}: {problems[0]}; run `pkd-cache verify {self.path}`")
            self._expected = expected_arrays(self.meta)
        try:
            return self._expected[split][name]
        except KeyError:
            raise PkdCacheError(f"store {self.path}: split {split} has no array {name}") from None

    def _arrow_backend(self):
        from .arrow import ArrowBackend

        if self._arrow is None:
            self._arrow = ArrowBackend(self.location, self.meta, self.checksums)
        return self._arrow

    def info(self) -> dict:
        return dict(self.meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def splits(self) -> list[str]:
        return list(self.meta.get("splits", {}))

    @property
    def teacher_layers(self) -> int:
        return int(self.meta["teacher"]["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["teacher"]["hidden_size"])

    def num_examples(self, split: str) -> int:
        return int(self._split_meta(split)["num_examples"])

    def _split_meta(self, split: str) -> dict:
        if split not in self.meta.get("splits", {}):
            raise PkdCacheError(f"store {self.path} has no split {split!r}; it has {', '.join(self.splits)}")
        return self.meta["splits"][split]

    def array(self, split: str, name: str) -> "ChunkedArray":
        """One array of a split, with `shape`, `dtype`, `chunks` and `[start:stop, ...]` slicing; every read goes
        through the checked chunk reader."""
        return ChunkedArray(self.chunk_reader(split, name))

    def read(self, split: str, start: int, stop: int, layers: Optional[Sequence[int]] = None,
             fields: Sequence[str] = ARRAYS) -> dict[str, np.ndarray]:
        """Examples [start, stop) of `fields` as numpy arrays; `cls` restricted to `layers` (indices into L+1)."""
        out = {}
        for name in fields:
            out[name] = self._rows(self.array(split, name), start, stop, layers if name == "cls" else None)
        if "cls" in out and out["cls"].dtype == np.int8:  # dequantised on read (see store/quantize.py)
            out["cls"] = dequantize_int8(out["cls"], self._rows(self.array(split, "cls_scale"), start, stop, layers))
        return out

    @staticmethod
    def _rows(array, start: int, stop: int, layers: Optional[Sequence[int]]) -> np.ndarray:
        rows = array[start:stop]
        return rows if layers is None else rows[:, list(layers)]

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                layers: Optional[Sequence[int]] = None, shuffle_chunks: int = 8,
                fields: Sequence[str] = ARRAYS, prefetch: int = 2, pin_memory: bool = False,
                start_batch: int = 0, shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """Dicts of torch tensors (`input_ids`, `attention_mask`, `token_type_ids`, `labels`, `logits`, `cls`).

        Token columns are cut to the batch's longest sequence. With `shuffle`, chunks are visited in a random
        order and examples are shuffled within groups of `shuffle_chunks` chunks; the order is a pure
        function of (seed, epoch) (see `pkd_cache.store.stream.epoch_groups`). `layers` selects CLS rows
        (0 = embeddings, i = layer i); `fields` the arrays. A thread reads `prefetch` groups ahead.
        `start_batch` skips the epoch's first batches (a resumed run continues where it stopped). `shard=(r, W)`
        gives rank r its part of every batch (`pkd_cache.store.stream.iter_batches`).
        """
        from .stream import iter_batches

        if batch_size <= 0:
            raise PkdCacheError(f"batch size must be > 0, got {batch_size}")
        self._split_meta(split)
        return iter_batches(self, split, batch_size, shuffle, seed, epoch, layers, fields, shuffle_chunks,
                            prefetch=prefetch, pin_memory=pin_memory, start_batch=start_batch, shard=shard)


class CheckedChunks:
    """A backend's chunk reader whose every chunk also has its values checked (`trust.value_problem`) once
    decoded: verify, distill and `Store.array` all read through this, so none of them trusts a chunk unchecked."""

    def __init__(self, reader, name: str, meta: dict, location, passed: Optional[set] = None):
        """`passed`: names of the chunks whose values were checked, shared by the store's readers, when every read
        is checked against the manifest (so a chunk read again is byte for byte the one checked); None: always."""
        self.reader, self.name, self.meta, self.location, self.passed = reader, name, meta, location, passed

    def __getattr__(self, attr):  # chunks, shape, dtype, buffer, chunk_name, file_key, ...
        return getattr(self.reader, attr)

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        out = self.reader.read_into(coords, out)
        seen = f"{self.name}:{self.reader.file_key(coords)}:{self.reader.chunk_name(coords)}"
        if self.passed is not None and seen in self.passed:
            return out
        rows = min(self.reader.chunks[0], self.reader.shape[0] - coords[0] * self.reader.chunks[0])
        why = value_problem(self.name, out[:rows], self.meta)
        if why:
            raise ChunkError(self.location, self.reader.file_key(coords), why)
        if self.passed is not None:
            self.passed.add(seen)
        return out


class ChunkedArray:
    """Row slices of one array, read chunk by chunk through a (checked) chunk reader, for either backend."""

    def __init__(self, reader):
        self.reader, self.shape, self.dtype, self.chunks = reader, reader.shape, reader.dtype, reader.chunks

    def __getitem__(self, key) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        if not isinstance(rows, slice):
            rows = slice(rows, rows + 1) if rows >= 0 else slice(rows, (rows + 1) or None)
        start, stop, step = rows.indices(self.shape[0])
        r, parts = self.chunks[0], []
        for c in range(start // r, -(-stop // r)) if stop > start else ():
            parts.append(self._whole_chunk(c)[max(0, start - c * r):stop - c * r])
        out = np.concatenate(parts)[::step] if parts else np.empty((0,) + tuple(self.shape[1:]), self.dtype)
        return out[(slice(None),) + key[1:]] if isinstance(key, tuple) else out

    def _whole_chunk(self, c: int) -> np.ndarray:
        """Chunk row `c` with every chunk along axis 1 (the per-layer `cls` chunks) side by side."""
        if len(self.shape) == 1:
            return self.reader.read_into((c,), self.reader.buffer()).copy()
        width = self.chunks[1]
        blocks = [self.reader.read_into((c, j) + (0,) * (len(self.shape) - 2), self.reader.buffer()).copy()
                  for j in range(-(-self.shape[1] // width))]
        return np.concatenate(blocks, axis=1)


def open_store(path: str, require_complete: bool = True, storage_options: Optional[dict] = None,
               allow_no_checksums: bool = False) -> Store:
    """Open a store from a local path or an fsspec URL (`s3://bucket/sst2.zarr`, `http://host:8000/sst2.zarr`).

    `allow_no_checksums` reads a store without a checksum manifest (pkd-cache 0.1.0 wrote such stores): its chunks
    are then decoded and their values checked, but not compared with dump-time checksums."""
    return Store(path, require_complete=require_complete, storage_options=storage_options,
                 allow_no_checksums=allow_no_checksums)
