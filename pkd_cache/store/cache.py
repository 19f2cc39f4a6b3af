"""The team cache: a folder or bucket of stores, each at a place named by what it holds.

    <cache>/<task>/<teacher>-<id>.<format>      e.g. s3://team/pkd/sst2/bert-base-uncased-3f9a1c2e7b40.zarr

`<id>` is the first 12 hex digits of the store's cache key (store/cache_key.py: teacher, tokenizer, data and
settings), so a dump computes where its store would be before running anything, and finds it there if anyone has
made it. `--cache URL` on a command, or the `PKD_CACHE` environment variable, names the cache. Wherever a command
takes `--store`, an id (or a unique prefix of one, at least 4 digits) names a store of the cache.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from typing import Optional

from ..errors import PkdCacheError
from .format import created_by
from .location import Location

ENV = "PKD_CACHE"
ID_DIGITS = 12
_ENTRY = re.compile(r"^(?P<teacher>.+)-(?P<id>[0-9a-f]{12})\.(?P<format>[a-z0-9_]+)$")
_ID = re.compile(r"^[0-9a-f]{4,64}$")  # an id, a unique prefix of one (4 digits at least), or a whole key


def cache_url(explicit: Optional[str] = None) -> Optional[str]:
    """The cache a command uses: `--cache URL`, else $PKD_CACHE, else None (no cache)."""
    return explicit or os.environ.get(ENV) or None


def store_id(key: str) -> str:
    """A store's id in the cache: the start of its cache key."""
    return key[:ID_DIGITS]


def teacher_slug(teacher: str) -> str:
    """The teacher's part of an entry's name: its last path component, in characters any filesystem takes."""
    last = teacher.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._]+", "-", last).strip("-.")[:64] or "teacher"


def entry_url(cache: str, task: str, teacher: str, key: str, store_format: str,
              storage_options: Optional[dict] = None) -> str:
    """Where the store of cache key `key` lives in `cache`: the entry of that id if there is one (the teacher's
    name in it is only a label: the same teacher in another folder has the same key), else a new one named after
    `teacher`."""
    base = f"{cache.rstrip('/')}/{task}"
    suffix = f"-{store_id(key)}.{store_format}"
    for name in Location(base, storage_options).list(""):
        if name.endswith(suffix) and _ENTRY.match(name):
            return f"{base}/{name}"
    return f"{base}/{teacher_slug(teacher)}{suffix}"


def claim_url(entry: str) -> str:
    """The lock that the one dump writing cache entry `entry` holds: a hidden sibling, `.<entry>.claim`, so that the
    entry itself is created by the writer as any store is (store/writer.py)."""
    parent, name = entry.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}.claim"


def used_key(name: str) -> str:
    """Where the last use of entry `task/entry` is recorded, relative to the cache: beside the entry, never in it
    (a complete store is never written to), for `pkd-cache gc` (store/gc.py)."""
    task, entry = name.split("/", 1)
    return f"{task}/.{entry}.used"


def record_use(cache: str, name: str, storage_options: Optional[dict] = None) -> None:
    """Note that entry `name` (`task/entry`) was just used. Best effort: a read-only cache still serves."""
    at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    try:
        Location(cache, storage_options).write(used_key(name), json.dumps({"at": at, "by": created_by()}).encode())
    except (OSError, PkdCacheError):
        pass


def looks_like_id(text: str) -> bool:
    return bool(_ID.match(text))


def entries(cache: str, storage_options: Optional[dict] = None) -> list[tuple[str, str]]:
    """(relative name `task/entry`, id) of every entry-shaped folder in the cache (unchecked: not read)."""
    location = Location(cache, storage_options)
    if not location.exists():
        raise PkdCacheError(f"cache {cache} does not exist (PKD_CACHE or --cache names it)")
    found = []
    for task in location.list(""):
        if task.startswith("."):
            continue
        for name in location.list(task):
            match = _ENTRY.match(name)
            if match:
                found.append((f"{task}/{name}", match["id"]))
    return found


def resolve_store(store: str, cache: Optional[str], storage_options: Optional[dict] = None) -> str:
    """`--store` as given, or the cache entry it names by id. A path or URL that exists is never taken for an id."""
    cache = cache_url(cache)
    if cache is None or not looks_like_id(store) or Location(store, storage_options).exists():
        return store
    matches = sorted(name for name, ident in entries(cache, storage_options) if ident.startswith(store[:ID_DIGITS]))
    if not matches:
        raise PkdCacheError(f"no store in cache {cache} has id {store}")
    if len(matches) > 1:
        raise PkdCacheError(f"id {store} matches {len(matches)} stores in cache {cache} ({', '.join(matches[:3])}"
                            f"{', ...' if len(matches) > 3 else ''}); give more of it")
    record_use(cache, matches[0], storage_options)
    return f"{cache.rstrip('/')}/{matches[0]}"
