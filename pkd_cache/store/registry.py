"""The store backends by name (MosaicML streaming's name -> algorithm table): `dump --format NAME` picks the writer,
and a store being opened picks its reader by the metadata file it holds. Adding a format is one module implementing
`backend.Backend` plus its line here (and its name in `config.STORE_FORMATS`, which the dump settings accept)."""
from __future__ import annotations

import json

from ..errors import PkdCacheError
from .arrow_backend import ArrowBackend
from .backend import Backend
from .zarr_backend import ZarrBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (ZarrBackend, ArrowBackend)}  # first: tried first


def backend_named(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise PkdCacheError(f"unknown store format {name!r}; pkd-cache writes {', '.join(BACKENDS)}") from None


def backend_at(location, path: str) -> tuple[type[Backend], object]:
    """The backend of the store at `location` and the metadata its metadata file holds (not yet checked: any JSON
    value, or None); refuses a location that holds no store."""
    for backend in BACKENDS.values():
        if location.exists(backend.meta_key):
            try:
                doc = json.loads(location.read(backend.meta_key))
            except ValueError as e:
                raise PkdCacheError(f"{path} is not a pkd-cache store ({backend.meta_key} is not valid JSON: {e})") \
                    from e
            return backend, backend.metadata_in(doc)
    keys = " or ".join(b.meta_key for b in BACKENDS.values())
    what = f"is not a pkd-cache store (no {keys})" if location.exists() else "does not exist"
    raise PkdCacheError(f"store {path} {what}")
