"""A dump's single-writer lock, kept inside the unfinished store, and the clean-up of what a killed writer left.

    <store>/.pkd_cache/lock.json                       {host, pid, proc_start, started} of the dump writing the
                                                       store (proc_start: the process's start time)

The same folder holds the dump's durable progress (store/integrity.py); `finish` folds it into `checksums.json`
and removes the folder once the store is complete.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
from typing import Optional

from ..errors import StoreBusy
from .format import JOURNAL as FOLDER
from .location import Location

LOCK = f"{FOLDER}/lock.json"


class WriterLock:
    """One dump per store: `acquire` refuses while another live process holds it; a dead holder's is taken over.

    A holder is identified by host, pid and (on Linux) the process's start time, so that a pid the system has
    since given to another process does not keep the store locked forever.
    """

    def __init__(self, location: Location):
        self.location, self.held = location, False

    def acquire(self) -> None:
        me = holder_record()
        holder = self.check()
        if not self.location.url:
            path = self.location.local / LOCK
            path.parent.mkdir(parents=True, exist_ok=True)
            if holder is not None:
                self._take_over(path, holder)
            if not _create_exclusive(path, json.dumps(me)):  # of two dumps starting at once, one wins
                raise StoreBusy(self._busy(self._holder() or {}))
        else:  # an object store: a conditional write (S3 `If-None-Match: *`) lets one of two dumps create it
            if holder is not None:  # a dead holder on this host (store/journal.py `_stale`): its lock goes first
                self.location.remove(LOCK)
            if not self.location.create(LOCK, json.dumps(me).encode()):
                raise StoreBusy(self._busy(self._holder() or {}))
        self.held = True

    def check(self) -> Optional[dict]:
        """Refuse if a live process holds the lock; the dead holder's record (to take over), or None."""
        holder = self._holder()
        if holder is not None and not self._stale(holder):
            raise StoreBusy(self._busy(holder))
        return holder

    def live_holder(self) -> Optional[dict]:
        """The record of the live process (not this one) holding the lock; None if none does."""
        holder = self._holder()
        return holder if holder is not None and not self._stale(holder) else None

    def release(self) -> None:
        if self.held:
            try:
                self.location.remove(LOCK)
            except OSError:
                pass
            self.held = False

    def _busy(self, holder: dict) -> str:
        return f"{self.location} is being written by another dump ({describe_holder(holder)}); wait for it, or stop it"

    def _take_over(self, path, holder: dict) -> None:
        """Move a dead holder's lock aside. If another dump replaced it meanwhile, the moved lock is not the one
        judged dead: it is put back and that dump named."""
        aside = path.with_name(f".lock.{os.getpid()}.{secrets.token_hex(4)}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # already moved by another dump; the exclusive link decides who takes it
        moved = _read_json(aside)
        if moved != holder:
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            except OSError:  # no hard links: renamed back unless a lock appeared meanwhile
                if not path.exists():
                    os.rename(aside, path)
            aside.unlink(missing_ok=True)
            raise StoreBusy(self._busy(moved))
        aside.unlink(missing_ok=True)

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.location.read(LOCK))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if "host" not in holder:
            return True  # unreadable or not ours: no one to respect
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: cannot tell, so it is respected
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        except OverflowError:
            return True
        if pid == os.getpid():
            return True
        if process_state(pid) in ("Z", "X"):  # killed, not yet reaped by its parent: it will never write again
            return True
        recorded, now = holder.get("proc_start"), process_start(pid)
        # the pid is alive, but a different process if it started at another time (a reused pid); without /proc
        # (or in a lock written before start times were recorded) the live pid is respected
        return isinstance(recorded, int) and now is not None and now != recorded


def holder_record() -> dict:
    """Who holds a lock: this process, by host, pid, start time (Linux) and when it took the lock."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": process_start(os.getpid()),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def describe_holder(holder: dict) -> str:
    """`pid N on HOST, since T`: how a refused run names the one holding the lock."""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields 3.. of /proc/<pid>/stat (Linux), None elsewhere or once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # field 2 (the command name) may hold spaces and parentheses: count fields after its closing one
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> Optional[int]:
    """When process `pid` started, in clock ticks since boot (Linux: field 22 of /proc/<pid>/stat); None elsewhere."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def process_state(pid: int) -> Optional[str]:
    """R, S, D, Z (a zombie: dead, not yet reaped), ... (Linux: field 3 of /proc/<pid>/stat); None elsewhere."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _create_exclusive(path, text: str) -> bool:
    """Create `path` holding `text` unless it exists. Written aside then hard-linked into place, so the lock is
    never seen empty (a loser always reads who holds it); O_EXCL where the filesystem has no hard links."""
    tmp = path.with_name(f".lock.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network and FUSE filesystems)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path) -> dict:
    """A lock file's record; {} if unreadable (as `WriterLock._holder` reads it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def remove_partial_files(location: Location) -> int:
    """Delete what a killed writer left half-written in a local store (object stores write whole objects): our
    chunk files' `.<name>.<random>.tmp` and zarr's metadata files' `zarr.<random>.partial`. Returns the count."""
    if location.url or not location.local.is_dir():
        return 0
    stray = [p for pattern in (".*.tmp", "zarr.*.partial") for p in location.local.rglob(pattern) if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return len(stray)
