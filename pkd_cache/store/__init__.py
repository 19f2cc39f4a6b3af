"""The store: format constants, writer, reader, fingerprints."""
from .format import ARRAYS, FORMAT_NAME, FORMAT_VERSION
from .reader import Store, open_store
from .writer import StoreWriter, check_target, open_writer

__all__ = ["ARRAYS", "FORMAT_NAME", "FORMAT_VERSION", "Store", "open_store", "StoreWriter", "check_target", "open_writer"]
