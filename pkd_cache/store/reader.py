"""Reading a store: its metadata, and shuffled or ordered batches of torch tensors."""
from __future__ import annotations

import json
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import zarr

from ..errors import PkdCacheError
from .chunks import CHECKSUMS_KEY, ChunkReader
from .format import ARRAYS, FORMAT_NAME, FORMAT_VERSION
from .arrow import ARROW_META
from .location import Location
from .quantize import dequantize_int8


class Store:
    """A pkd-cache store opened read-only. `info()` is the metadata; `batches()` streams examples."""

    def __init__(self, path: str, require_complete: bool = True, storage_options: Optional[dict] = None):
        self.path = str(path)
        self.location = Location(self.path, storage_options)
        self.root = None  # the Zarr group (None for an Arrow store)
        if self.location.exists("zarr.json"):
            try:
                self.root = zarr.open_group(store=self.location.zarr_store(read_only=True), mode="r")
                attrs = dict(self.root.attrs)
            except Exception as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store (cannot open it as a Zarr group: {e})") from e
        elif self.location.exists(ARROW_META):
            try:
                attrs = json.loads(self.location.read(ARROW_META))
            except ValueError as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store ({ARROW_META} is not valid JSON: {e})") from e
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
        self._checksums: Optional[dict] = None
        self._arrow = None
        self._checked: set[tuple[str, str]] = set()

    @property
    def store_format(self) -> str:
        return "zarr" if self.root is not None else "arrow"

    @property
    def checksums(self) -> Optional[dict]:
        """The manifest's {chunk key: [nbytes, crc32c]}, or None for a store written before checksums existed."""
        if self._checksums is None and self.meta.get("checksums"):
            key = self.meta["checksums"].get("file", CHECKSUMS_KEY)
            try:
                manifest = json.loads(self.location.read(key))
            except FileNotFoundError:
                raise PkdCacheError(f"store {self.path}: its checksum manifest {key} is missing; the store is damaged "
                                    f"(run `pkd-cache verify {self.path}`)") from None
            except ValueError as e:
                raise PkdCacheError(f"store {self.path}: its checksum manifest {key} is not valid JSON ({e})") from e
            self._checksums = manifest.get("chunks", {})
        return self._checksums

    def size_bytes(self) -> int:
        """Bytes of the store: the files on disk for a local store; for a remote one, the chunks its manifest
        records (one request instead of a listing of every chunk)."""
        if self.location.url and self.checksums is not None:
            return sum(n for n, _ in self.checksums.values())
        return self.location.size()

    def chunk_reader(self, split: str, name: str):
        if self.root is None:
            return self._arrow_backend().chunk_reader(split, name)
        return ChunkReader(self.array(split, name), self.location, f"{split}/{name}", self.checksums)

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

    def array(self, split: str, name: str):
        """One array of a split: a zarr array, or for an Arrow store an object with the same shape, dtype,
        chunks and `[start:stop]` slicing."""
        self._split_meta(split)
        if self.root is None:
            return self._arrow_backend().array(split, name)
        if (split, name) not in self._checked:
            check_plain_array(self.location, f"{split}/{name}")
            self._checked.add((split, name))
        return self.root[split][name]

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
        function of (seed, epoch) (see `pkd_cache.stream.epoch_groups`). `layers` selects CLS rows
        (0 = embeddings, i = layer i); `fields` the arrays. A thread reads `prefetch` groups ahead.
        `start_batch` skips the epoch's first batches (a resumed run continues where it stopped). `shard=(r, W)`
        gives rank r its part of every batch (`pkd_cache.stream.iter_batches`).
        """
        from ..stream import iter_batches

        if batch_size <= 0:
            raise PkdCacheError(f"batch size must be > 0, got {batch_size}")
        self._split_meta(split)
        return iter_batches(self, split, batch_size, shuffle, seed, epoch, layers, fields, shuffle_chunks,
                            prefetch=prefetch, pin_memory=pin_memory, start_batch=start_batch, shard=shard)


SAFE_CODECS = ("bytes", "blosc", "zstd", "gzip", "crc32c", "transpose")
SAFE_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
               "float32", "float64")


def check_plain_array(location: Location, key: str) -> None:
    """Refuse an array whose metadata asks for anything but plain numbers and known codecs, before zarr sees it.

    A store from someone else must be safe to open: no object dtypes, no pickle or other codec that could run
    code or that pkd-cache does not know.
    """
    try:
        meta = json.loads(location.read(f"{key}/zarr.json"))
    except FileNotFoundError:
        raise PkdCacheError(f"store {location}: array {key} is missing") from None
    except ValueError as e:
        raise PkdCacheError(f"store {location}: {key}/zarr.json is not valid JSON ({e})") from e
    dtype = meta.get("data_type")
    if meta.get("node_type") != "array" or dtype not in SAFE_DTYPES:
        raise PkdCacheError(f"store {location}: array {key} has data type {dtype!r}; pkd-cache opens only plain "
                            f"numeric arrays")
    names = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]
    bad = [n for n in names if n not in SAFE_CODECS]
    if bad or meta.get("storage_transformers"):
        raise PkdCacheError(f"store {location}: array {key} uses codec {bad[0] if bad else 'storage transformers'!r}, "
                            f"which pkd-cache does not open (allowed: {', '.join(SAFE_CODECS)})")


def open_store(path: str, require_complete: bool = True, storage_options: Optional[dict] = None) -> Store:
    """Open a store from a local path or an fsspec URL (`s3://bucket/sst2.zarr`, `http://host:8000/sst2.zarr`)."""
    return Store(path, require_complete=require_complete, storage_options=storage_options)
