"""The store formats, one module each (docs/ARCHITECTURE.md): a module here that names its `backend.Backend`
class `BACKEND` is a format `dump --format` writes and `Store` opens (store/registry.py finds it)."""
