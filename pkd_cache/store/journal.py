"""A dump's durable progress and its single-writer lock, kept inside the unfinished store.

    <store>/.pkd_cache/progress/<split>/<chunk>.json   {file key: [nbytes, crc32c]} of one chunk's files, written
                                                       (atomically) only after all of them are in place
    <store>/.pkd_cache/lock.json                       {host, pid, started} of the dump writing the store

A chunk counts as durable only if its record exists and every file it lists is there with the recorded size and
CRC; anything else a crash left behind is redone. `finish` folds the records into `checksums.json` and removes
the folder once the store is complete.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
from typing import Optional

from ..errors import PkdCacheError
from .chunks import crc32c
from .location import Location

FOLDER = ".pkd_cache"
PROGRESS = f"{FOLDER}/progress"
LOCK = f"{FOLDER}/lock.json"


def record_chunk(location: Location, split: str, chunk: int, checksums: dict[str, list[int]]) -> None:
    location.write(f"{PROGRESS}/{split}/{chunk:06d}.json", json.dumps(checksums).encode())


def durable_chunks(location: Location, split: str) -> dict[int, dict[str, list[int]]]:
    """{chunk: its files' checksums} for the chunks of `split` whose record and files check out."""
    out = {}
    for name in location.list(f"{PROGRESS}/{split}"):
        if not name.endswith(".json"):
            continue
        try:
            record = json.loads(location.read(f"{PROGRESS}/{split}/{name}"))
            ok = all(_matches(location, key, n, crc) for key, (n, crc) in record.items())
        except (OSError, ValueError, TypeError):
            ok = False
        if ok:
            out[int(name[:-5])] = record
    return out


def _matches(location: Location, key: str, n: int, crc: int) -> bool:
    try:
        data = location.read(key)
    except FileNotFoundError:
        return False
    return len(data) == n and crc32c(data) == crc


class WriterLock:
    """One dump per store: `acquire` refuses while another live process holds it; a dead holder's is taken over."""

    def __init__(self, location: Location):
        self.location, self.held = location, False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        holder = self._holder()
        if holder is not None and not self._stale(holder):
            raise PkdCacheError(f"{self.location} is being written by another dump (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('started')}); wait for it, or stop it")
        if not self.location.url:
            path = self.location.local / LOCK
            path.parent.mkdir(parents=True, exist_ok=True)
            if holder is not None:
                path.unlink(missing_ok=True)  # a dead process's lock: taken over
            try:  # created exclusively: of two dumps starting at once, one wins
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise PkdCacheError(f"{self.location} is being written by another dump that just started") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        else:  # object stores have no exclusive create: best effort
            self.location.write(LOCK, json.dumps(me).encode())
        self.held = True

    def release(self) -> None:
        if self.held:
            try:
                self.location.remove(LOCK)
            except OSError:
                pass
            self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.location.read(LOCK))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so it is respected
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return pid == os.getpid()


def remove_partial_files(location: Location) -> int:
    """Delete what a killed writer left half-written in a local store (object stores write whole objects): our
    chunk files' `.<name>.<random>.tmp` and zarr's metadata files' `zarr.<random>.partial`. Returns the count."""
    if location.url or not location.local.is_dir():
        return 0
    stray = [p for pattern in (".*.tmp", "zarr.*.partial") for p in location.local.rglob(pattern) if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return len(stray)
