"""Where a store lives: a local folder or an fsspec URL (`s3://`, `gs://`, `http(s)://`, `memory://`, ...).

Everything pkd-cache reads or writes inside a store goes through a `Location`: the Zarr metadata (handed to zarr as
a store object), the chunk files and the checksum manifest. Local folders use plain file IO (the fast path);
anything with a scheme goes through fsspec. `http(s)://` is read-only. A bearer token for `pkd-cache serve` is
taken from the environment variable `PKD_CACHE_TOKEN`.
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Optional

from ..errors import PkdCacheError

TOKEN_ENV = "PKD_CACHE_TOKEN"
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_url(path: str) -> bool:
    return bool(_SCHEME.match(str(path))) and not str(path).startswith("file://")


class Location:
    """A store's root. Keys are '/'-separated paths relative to it (`train/cls/c/0/3/0`)."""

    def __init__(self, path: str, storage_options: Optional[dict] = None):
        self.path = str(path)
        self.url = is_url(self.path)
        self.read_only = self.path.startswith(("http://", "https://"))
        if self.url:
            self.storage_options = {**_default_options(self.path), **(storage_options or {})}
            self.fs, self.root = _filesystem(self.path, self.storage_options)
        else:
            self.storage_options = {}
            local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
            self.local = Path(local).expanduser()
            self.root = str(self.local)

    def __str__(self) -> str:
        return self.path

    def child(self, name: str) -> "Location":
        """The location of `name` inside this one (same credentials and options)."""
        return Location(f"{self.path.rstrip('/')}/{name}", self.storage_options if self.url else None)

    def _full(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def read(self, key: str) -> bytes:
        """The bytes at `key`; FileNotFoundError when absent."""
        if not self.url:
            with open(self.local / key, "rb") as f:
                return f.read()
        with self._remote_errors(key):
            return self.fs.cat_file(self._full(key))

    def exists(self, key: str = "") -> bool:
        if not self.url:
            return (self.local / key).exists()
        try:
            with self._remote_errors(key):
                if self.read_only:  # http(s): a GET says why when the server cannot be reached; HEAD hides it
                    self.fs.cat_file(self._full(key), start=0, end=1)
                else:
                    self.fs.info(self._full(key))
            return True
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def _remote_errors(self, key: str):
        """A missing key is FileNotFoundError; anything else the remote side says becomes one clear line."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, PkdCacheError):  # FileExistsError: a `create` that lost
            raise
        except Exception as e:
            if _is_not_found(e):
                raise FileNotFoundError(f"{self.path}/{key}") from e
            status = getattr(e, "status", None)
            if status == 503:  # `pkd-cache serve` at its connection cap
                raise PkdCacheError(f"{self.path}: the server is busy (503); retry in a moment") from e
            if status in (401, 403) or isinstance(e, PermissionError):
                hint = " (set PKD_CACHE_TOKEN)" if self.read_only and status != 403 else \
                    " (the server refuses this path)" if status == 403 else " (check the credentials)"
                raise PkdCacheError(f"{self.path}: access denied{hint}") from e
            raise PkdCacheError(f"cannot reach {self.path} ({type(e).__name__}; --debug shows the details)") from e

    def list(self, key: str) -> list[str]:
        """Names of the entries directly under `key` (empty if it does not exist)."""
        if not self.url:
            folder = self.local / key
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        try:
            with self._remote_errors(key):
                return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self._full(key), detail=False))
        except FileNotFoundError:
            return []

    def remove(self, key: str) -> None:
        """Delete `key` (a file or a folder) if it exists."""
        self.check_writable()
        if not self.url:
            import shutil

            target = self.local / key
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            return
        if self.fs.exists(self._full(key)):
            self.fs.rm(self._full(key), recursive=True)

    def file_count(self) -> int:
        """Files under the store (a bound on how many chunks it can hold, for a store without a manifest)."""
        if self.url:
            return len(self.fs.find(self.root))
        return sum(len(files) for _, _, files in os.walk(self.local))

    def size(self) -> int:
        """Bytes under the root."""
        if not self.url:
            return sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file())
        return int(self.fs.du(self.root, total=True))

    def write(self, key: str, data: bytes) -> None:
        """Write `key` whole; a local file appears only once complete (written aside, then renamed)."""
        self.check_writable()
        if not self.url:
            target = self.local / key
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        with self._remote_errors(key):
            self.fs.pipe_file(self._full(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet, atomically on an object store (S3's `If-None-Match: *`
        conditional write, through fsspec's `mode="create"`); False if it existed. Remote locations only: a local
        lock is created by store/journal.py (hard link, or O_EXCL)."""
        self.check_writable()
        try:
            with self._remote_errors(key):
                self.fs.pipe_file(self._full(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove_all(self) -> None:
        """Delete the whole store (used by --overwrite after the caller checked it is a store)."""
        self.check_writable()
        if not self.url:
            import shutil

            if self.local.is_dir():
                shutil.rmtree(self.local)
            elif self.local.exists():
                self.local.unlink()
            return
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def zarr_store(self, read_only: bool):
        """A zarr-python store object rooted here."""
        from zarr.storage import FsspecStore, LocalStore

        if not self.url:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.path, storage_options=self.storage_options,
                                    read_only=read_only or self.read_only)

    def check_writable(self) -> None:
        """Refuse to write where the store can only be read."""
        if self.read_only:
            raise PkdCacheError(f"{self.path} is read-only (http(s) stores can be read, not written)")


def _default_options(url: str) -> dict:
    token = os.environ.get(TOKEN_ENV)
    if url.startswith(("http://", "https://")) and token:
        return {"headers": {"Authorization": f"Bearer {token}"}}
    return {}


def _filesystem(url: str, options: dict):
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url, **options)
    except ImportError as e:  # s3fs, gcsfs, aiohttp: the protocol's own package
        raise PkdCacheError(f"cannot open {url}: {e} (pip install 'pkd-cache[remote]')") from e
    except ValueError as e:
        scheme = url.split("://", 1)[0]
        raise PkdCacheError(f"cannot open {url}: no filesystem for {scheme}:// (use a local path or s3://, gs://, "
                            f"http(s)://, memory://, or another fsspec protocol)") from e


def _is_not_found(e: Exception) -> bool:
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    return status == 404 or "404" in str(e)[:200] or "NoSuchKey" in str(e)
