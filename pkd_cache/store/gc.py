"""`pkd-cache gc`: remove a team cache's stores by age since last use, or the least recently used first until the
cache fits a size.

Object stores have no access times, so each use is recorded beside the entry, never inside it (a store is never
written once complete): `<cache>/<task>/.<entry>.used` holds `{"at": <ISO time>, "by": "user@host"}`, written by a
cache hit of `dump` and by every id that resolves to the entry (store/cache.py `record_use`). An entry never used since it was
made counts from `completed_at` (or `created_at`).

Never removed: an entry being written (a live dump holds its claim or its store lock, store/journal.py), and one used
within the grace period.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import PkdCacheError
from .cache import claim_url, entries, used_key
from .journal import WriterLock
from .location import Location
from .registry import read_metadata

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?)B?\s*$", re.IGNORECASE)


def parse_duration(text: str, flag: str) -> dt.timedelta:
    """`90d`, `12h`, `30m`, `2w`, `45s`."""
    m = _DURATION.match(text or "")
    if not m:
        raise PkdCacheError(f"{flag} takes a duration like 90d, 12h or 30m; got {text!r}")
    return dt.timedelta(seconds=float(m[1]) * _SECONDS[m[2].lower()])


def parse_size(text: str, flag: str) -> int:
    """`2TB`, `500GB`, `1.5GiB`, `100MB`, `4096` (bytes): decimal units, or binary with an `i`."""
    m = _SIZE.match(text or "")
    if not m:
        raise PkdCacheError(f"{flag} takes a size like 2TB, 500GB or 1.5GiB; got {text!r}")
    power = "KMGTP".find(m[2].upper()) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


@dataclass
class Entry:
    name: str  # task/entry
    id: str
    bytes: int
    last_used: dt.datetime
    busy: Optional[str]  # why it must stay: being written, or used within the grace period


def survey(cache: str, grace: dt.timedelta, storage_options: Optional[dict] = None) -> list[Entry]:
    """Every entry of the cache with its size, last use and whether it must stay; least recently used first."""
    root = Location(cache, storage_options)
    now, out = _now(), []
    for name, ident in entries(cache, storage_options):
        location = root.child(name)
        meta = read_metadata(location)
        if meta is None:  # named like an entry but not a pkd-cache store: not ours to remove
            continue
        used = _time(_read_json(root, used_key(name)).get("at")) or _time(meta.get("completed_at")) or \
            _time(meta.get("created_at")) or dt.datetime.fromtimestamp(0, dt.timezone.utc)
        busy = None
        holder = WriterLock(Location(claim_url(location.path), storage_options)).live_holder() or \
            WriterLock(location).live_holder()
        if holder is not None:
            busy = f"being written (pid {holder.get('pid')} on {holder.get('host')})"
        elif now - used < grace:
            busy = "used within the grace period"
        out.append(Entry(name, ident, location.size(), used, busy))
    return sorted(out, key=lambda e: e.last_used)


def plan(entries_: list[Entry], older_than: Optional[dt.timedelta], max_size: Optional[int]) -> list[Entry]:
    """The entries to remove: every removable one unused for `older_than`, then the least recently used removable
    ones until the cache holds at most `max_size` bytes."""
    now = _now()
    doomed = [e for e in entries_ if e.busy is None and older_than is not None and now - e.last_used >= older_than]
    if max_size is not None:
        total = sum(e.bytes for e in entries_) - sum(e.bytes for e in doomed)
        for e in entries_:  # least recently used first
            if total <= max_size:
                break
            if e.busy is None and e not in doomed:
                doomed.append(e)
                total -= e.bytes
    return doomed


def remove(cache: str, doomed: list[Entry], storage_options: Optional[dict] = None) -> None:
    root = Location(cache, storage_options)
    for e in doomed:
        root.child(e.name).remove_all()
        root.remove(used_key(e.name))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _time(text) -> Optional[dt.datetime]:
    try:
        t = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _read_json(location: Location, key: str) -> dict:
    try:
        doc = json.loads(location.read(key))
    except (OSError, ValueError, PkdCacheError):
        return {}
    return doc if isinstance(doc, dict) else {}
