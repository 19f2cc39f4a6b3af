"""The store: format constants, writer, reader, fingerprints.

Names are imported on first use (PEP 562): `pkd-cache ls` and `serve` use only the light modules here
(location, describe, registry) and pay for numpy at most, never for zarr or torch.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .format import ARRAYS, FORMAT_NAME, FORMAT_VERSION
    from .reader import Store, open_store
    from .writer import check_target, open_writer
    from .backends.zarr_backend import StoreWriter

_LAZY = {"ARRAYS": "format", "FORMAT_NAME": "format", "FORMAT_VERSION": "format", "Store": "reader",
         "open_store": "reader", "StoreWriter": "backends.zarr_backend", "check_target": "writer", "open_writer": "writer"}

__all__ = ["ARRAYS", "FORMAT_NAME", "FORMAT_VERSION", "Store", "open_store", "StoreWriter", "check_target", "open_writer"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
