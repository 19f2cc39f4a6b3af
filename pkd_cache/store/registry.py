"""The store backends by name (MosaicML streaming's name -> algorithm table): `dump --format NAME` picks the writer,
and a store being opened picks its reader by the metadata file it holds.

Adding a format is one new module in store/backends/ that implements `backend.Backend` and names its class
`BACKEND`: the modules there are found when this one is first used, so no list names them.
"""
from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from typing import Optional

from ..errors import PkdCacheError
from . import backends
from .backend import Backend
from .format import FORMAT_NAME


@functools.lru_cache(maxsize=1)
def all_backends() -> dict[str, type[Backend]]:
    """{name: backend class} of every module in store/backends/, in the order a store is tried (`order`)."""
    found = []
    for info in pkgutil.iter_modules(backends.__path__):
        module = importlib.import_module(f"{backends.__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if backend is not None:
            found.append(backend)
    return {b.name: b for b in sorted(found, key=lambda b: (getattr(b, "order", 100), b.name))}


def backend_named(name: str) -> type[Backend]:
    try:
        return all_backends()[name]
    except KeyError:
        raise PkdCacheError(f"unknown store format {name!r}; pkd-cache writes {', '.join(all_backends())}") from None


def meta_files() -> tuple[str, ...]:
    """The files that can hold a store's metadata, one per format (`serve` refuses a store where one is a link)."""
    return tuple(b.meta_key for b in all_backends().values())


def backend_at(location, path: str) -> tuple[type[Backend], object]:
    """The backend of the store at `location` and the metadata its metadata file holds (not yet checked: any JSON
    value, or None); refuses a location that holds no store."""
    for backend in all_backends().values():
        if location.exists(backend.meta_key):
            try:
                doc = json.loads(location.read(backend.meta_key))
            except ValueError as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store ({backend.meta_key} is not valid JSON: {e})") \
                    from e
            return backend, backend.metadata_in(doc)
    keys = " or ".join(meta_files())
    what = f"is not a pkd-cache store (no {keys})" if location.exists() else "does not exist"
    raise PkdCacheError(f"store {path} {what}")


def read_metadata(location) -> Optional[dict]:
    """The metadata of the store at `location` (any format), None if there is no store there. Unchecked: `ls`,
    `serve` and the writer's overwrite checks read it as a dict (store/trust.py checks it when a store is opened)."""
    for backend in all_backends().values():
        try:
            meta = backend.metadata_in(json.loads(location.read(backend.meta_key)))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME:
            return meta
    return None
