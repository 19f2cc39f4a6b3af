"""Reading a store: its metadata, and shuffled or ordered batches of torch tensors.

`Store` picks its backend when it opens (store/registry.py, by the metadata file the store holds) and is the one
place every read passes through: the metadata checked before it is used (`meta`), the layout against the manifest
at open (`layout_problems`), and each array handed out only as a checked source (`chunk_reader`, store/backend.py)
whose chunk files are compared with the manifest and whose values are checked."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from ..errors import PkdCacheError
from .backend import Backend, ChunkedArray, CheckedChunks, LayoutProblem, checked_source
from .format import ARRAYS, FORMAT_NAME, LAYER_AXIS_ARRAYS, READ_VERSION, StoreMeta
from .integrity import NO_MANIFEST, ChunkFiles, file_problems, load_manifest, manifest_problems
from .location import Location
from .quantize import dequantize_int8
from .cache import resolve_store
from .registry import backend_at
from .trust import meta_problems

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
        self.path = resolve_store(str(path), None, storage_options)  # an id names a store of the cache
        self.location = Location(self.path, storage_options)
        backend, attrs = backend_at(self.location, self.path)
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise PkdCacheError(f"{path} is not a pkd-cache store (no 'format: {FORMAT_NAME}' attribute)")
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > READ_VERSION:
            raise PkdCacheError(f"store {path} has format version {version}; this pkd-cache reads up to "
                                f"{READ_VERSION}: upgrade pkd-cache")
        if require_complete and not attrs.get("complete"):
            raise PkdCacheError(f"store {path} is not complete (its dump did not finish); re-run the dump")
        self._raw = attrs  # the metadata as stored; `meta` is it typed, once checked
        self._meta: Optional[StoreMeta] = None
        self._backend_type, self._backend = backend, None
        self.allow_no_checksums = allow_no_checksums
        self._manifest: Optional[tuple] = None  # (checksums or None,) once loaded
        self._files: Optional[ChunkFiles] = None
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

    @property
    def backend(self) -> Backend:
        """The store's format (store/registry.py), given the metadata once it is checked."""
        if self._backend is None:
            self._backend = self._backend_type(self.location, self.meta)
        return self._backend

    @property
    def meta(self) -> StoreMeta:
        """The metadata, typed (`info()` is the dict as stored); refused while `trust.meta_problems` finds any."""
        if self._meta is None:
            problems = meta_problems(self._raw)
            if problems:
                raise PkdCacheError(f"store {self.path}: {problems[0]}; run `pkd-cache verify {self.path}`")
            self._meta = StoreMeta.from_dict(self._raw)
        return self._meta

    def layout_problems(self, check_files: bool = False) -> list[str]:
        """What disagrees between the metadata, each array's `zarr.json` and the manifest (store/trust.py), with
        `check_files` also each chunk file's presence and size (local stores: one stat per chunk). Empty when the
        store is sound enough to read chunk by chunk; nothing here allocates in proportion to a claimed size."""
        problems = meta_problems(self._raw)
        if problems:
            return problems
        grids: dict[str, tuple] = {}  # "train/cls" -> (shape, chunk shape)
        for split, arrays in self.meta.expected_arrays().items():
            for name, (shape, dtype) in arrays.items():
                try:
                    grids[f"{split}/{name}"] = (shape, self._chunks_of(split, name, shape, dtype))
                except LayoutProblem as e:
                    problems.append(str(e))
        if problems:
            return problems
        counts, keys = self.backend.file_keys(grids)
        manifest = self.checksums
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
            problems += file_problems(self.location, manifest)
        return problems

    def _chunks_of(self, split: str, name: str, shape, dtype) -> tuple[int, ...]:
        """The chunk shape of an array once the backend has checked its stored description; raises LayoutProblem."""
        if (split, name) not in self._chunks:
            self._chunks[split, name] = self.backend.chunks_of(split, name, shape, dtype)
        return self._chunks[split, name]

    @property
    def store_format(self) -> str:
        return self._backend_type.name

    @property
    def checksums(self) -> Optional[dict]:
        """The manifest's {chunk key: [nbytes, crc32c]}, or None for a store that has none (and records none)."""
        if self._manifest is None:
            self._manifest = (load_manifest(self.location, self._raw),)
        return self._manifest[0]

    def size_bytes(self) -> int:
        """Bytes of the store: the files on disk for a local store; for a remote one, the chunks its manifest
        records (one request instead of a listing of every chunk)."""
        if self.location.url and self.checksums is not None:
            return sum(n for n, _ in self.checksums.values())
        return self.location.size()

    def chunk_reader(self, split: str, name: str) -> CheckedChunks:
        """Chunk by chunk reads of one array: each chunk checked against the manifest, its decoded size and its
        values (store/trust.py), whatever the backend."""
        shape, dtype = self._spec(split, name)
        try:
            chunks = self._chunks_of(split, name, shape, dtype)
        except LayoutProblem as e:
            raise PkdCacheError(f"store {self.path}: {e}; run `pkd-cache verify {self.path}`") from None
        if self._files is None:  # one per store: the Arrow backend keeps one shard cache for all its arrays
            self._files = ChunkFiles(self.location, self.checksums)
        return checked_source(self.backend, split, name, shape, dtype, chunks, self._files, self.meta,
                              self._values_checked)

    def _spec(self, split: str, name: str) -> tuple[tuple[int, ...], str]:
        self._split_meta(split)
        if self._expected is None:  # once per open store: every chunk reader of every epoch asks
            self._expected = self.meta.expected_arrays()
        try:
            return self._expected[split][name]
        except KeyError:
            raise PkdCacheError(f"store {self.path}: split {split} has no array {name}") from None

    def info(self) -> dict:
        """The metadata as stored, a dict (`meta` is it typed)."""
        return dict(self._raw)

    @property
    def complete(self) -> bool:
        return bool(self._raw.get("complete"))

    @property
    def splits(self) -> list[str]:
        splits = self._raw.get("splits")
        return list(splits) if isinstance(splits, dict) else []

    @property
    def teacher_layers(self) -> int:
        return self.meta.teacher.num_layers

    @property
    def hidden_size(self) -> int:
        return self.meta.teacher.hidden_size

    def num_examples(self, split: str) -> int:
        return self._split_meta(split).num_examples

    def _split_meta(self, split: str):
        if split not in self.splits:
            raise PkdCacheError(f"store {self.path} has no split {split!r}; it has {', '.join(self.splits)}")
        return self.meta.splits[split]

    def array(self, split: str, name: str) -> ChunkedArray:
        """One array of a split, with `shape`, `dtype`, `chunks` and `[start:stop, ...]` slicing; every read goes
        through the checked chunk reader."""
        return ChunkedArray(self.chunk_reader(split, name))

    def read(self, split: str, start: int, stop: int, layers: Optional[Sequence[int]] = None,
             fields: Sequence[str] = ARRAYS) -> dict[str, np.ndarray]:
        """Examples [start, stop) of `fields` as numpy arrays; `cls` restricted to `layers` (indices into L+1)."""
        out = {}
        for name in fields:
            out[name] = self._rows(self.array(split, name), start, stop, layers if name in LAYER_AXIS_ARRAYS else None)
        if "cls" in out and out["cls"].dtype == np.int8:  # dequantised on read (see store/quantize.py)
            out["cls"] = dequantize_int8(out["cls"], self._rows(self.array(split, "cls_scale"), start, stop, layers))
        return out

    @staticmethod
    def _rows(array, start: int, stop: int, layers: Optional[Sequence[int]]) -> np.ndarray:
        rows = array[start:stop]
        return rows if layers is None else rows[:, list(layers)]

    def to_hf_dataset(self, split: str):
        """The split as a `datasets.Dataset`, never copied into the HF cache: an Arrow store's shards opened in
        place (after a checked read of each), a Zarr store's split read into memory (store/as_dataset.py)."""
        from .as_dataset import to_hf_dataset

        return to_hf_dataset(self, split)

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                layers: Optional[Sequence[int]] = None, shuffle_chunks: int = 8,
                fields: Sequence[str] = ARRAYS, prefetch: int = 2, pin_memory: bool = False,
                start_batch: int = 0, shard: tuple[int, int] = (0, 1),
                workers: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Dicts of torch tensors (`input_ids`, `attention_mask`, `token_type_ids`, `labels`, `logits`, `cls`).

        Token columns are cut to the batch's longest sequence. With `shuffle`, chunks are visited in a random
        order and examples are shuffled within groups of `shuffle_chunks` chunks; the order is a pure
        function of (seed, epoch) (see `pkd_cache.store.stream.epoch_groups`). `layers` selects CLS rows
        (0 = embeddings, i = layer i); `fields` the arrays. A thread reads `prefetch` groups ahead.
        `start_batch` skips the epoch's first batches (a resumed run continues where it stopped). `shard=(r, W)`
        gives rank r its part of every batch (`pkd_cache.store.stream.iter_batches`). `workers`: threads that
        decode chunks (default: up to 4); 0 reads in the calling thread, nothing ahead.
        """
        from .stream import iter_batches

        if batch_size <= 0:
            raise PkdCacheError(f"batch size must be > 0, got {batch_size}")
        if self.meta.layout == "tokens":
            raise PkdCacheError(f"store {self.path} is a token store (dump --task lm): it is read in token-budget "
                                f"batches (pkd_cache.store.token_stream), not as examples")
        self._split_meta(split)
        return iter_batches(self, split, batch_size, shuffle, seed, epoch, layers, fields, shuffle_chunks,
                            prefetch=0 if workers == 0 else prefetch, workers=workers or None,
                            pin_memory=pin_memory, start_batch=start_batch, shard=shard)


def open_store(path: str, require_complete: bool = True, storage_options: Optional[dict] = None,
               allow_no_checksums: bool = False) -> Store:
    """Open a store from a local path or an fsspec URL (`s3://bucket/sst2.zarr`, `http://host:8000/sst2.zarr`).

    `allow_no_checksums` reads a store without a checksum manifest (pkd-cache 0.1.0 wrote such stores): its chunks
    are then decoded and their values checked, but not compared with dump-time checksums."""
    return Store(path, require_complete=require_complete, storage_options=storage_options,
                 allow_no_checksums=allow_no_checksums)
