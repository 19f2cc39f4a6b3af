"""Editing a local Zarr store the way someone tampering with it would: metadata, array metadata, chunks, manifest.

Used by the tampering tests: `from pkd_cache.testing.tamper import ...`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc))


def edit_attributes(store: Path, edit) -> None:
    """`edit(attributes)` in place on the root group's attributes (the store metadata)."""
    doc = read_json(store / "zarr.json")
    edit(doc["attributes"])
    write_json(store / "zarr.json", doc)


def edit_array(store: Path, array: str, edit) -> None:
    """`edit(zarr_json)` in place on an array's metadata (`array` like "train/logits")."""
    doc = read_json(store / array / "zarr.json")
    edit(doc)
    write_json(store / array / "zarr.json", doc)


def chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


def decode(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    import numcodecs.blosc

    out = np.empty(shape, dtype)
    numcodecs.blosc.decompress(path.read_bytes(), out)
    return out


def rewrite_chunk(store: Path, key: str, values: np.ndarray, record: bool = True) -> None:
    """Replace chunk `key` (`train/labels/c/0`) with `values` as a valid Blosc frame; with `record`, the manifest
    gets its new checksum too (a tamperer who knows the format)."""
    from pkd_cache.store.chunks import encode_chunk
    from pkd_cache.store.integrity import crc32c

    data = encode_chunk(values, {"cname": "zstd", "clevel": 3, "shuffle": 1, "blocksize": 0})
    (store / key).write_bytes(data)
    if record:
        manifest = read_json(store / "checksums.json")
        manifest["chunks"][key] = [len(data), crc32c(data)]
        write_json(store / "checksums.json", manifest)


def record_file(store: Path, key: str) -> None:
    """Make the manifest agree with whatever file `key` now holds."""
    from pkd_cache.store.integrity import crc32c

    manifest = read_json(store / "checksums.json")
    data = (store / key).read_bytes()
    manifest["chunks"][key] = [len(data), crc32c(data)]
    write_json(store / "checksums.json", manifest)
