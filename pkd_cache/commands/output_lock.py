"""One pkd-cache run per output folder at a time: `.<name>.pkd-lock` beside the folder, held with flock.

The lock file sits beside the folder (not in it) because the folder itself may not exist yet, and because a
finished run swaps a new folder in for the old one (paths.py). flock is released by the kernel when its holder
dies, however it dies, so there is no stale lock to detect or take over; the file only names the holder for the
message a second run prints.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import PkdCacheError
from ..store.journal import describe_holder, holder_record

SUFFIX = ".pkd-lock"


def lock_path(folder: Path) -> Path:
    folder = folder.expanduser().absolute()
    return folder.parent / f".{folder.name}{SUFFIX}"


class OutputLock:
    """`acquire` refuses (one line) while another process holds the lock of `folder`; `release` drops it."""

    def __init__(self, folder: Path, shown: str, flag: str = "--output-dir"):
        self.path, self.shown, self.flag, self.fd = lock_path(folder), shown, flag, None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # retried only when the holder removed the file between our open and our flock
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                who = describe_holder(holder) if holder else "a run that just started"
                raise PkdCacheError(f"{self.flag} {self.shown} is being written by another pkd-cache run ({who}); "
                                    f"wait for it, or choose another {self.flag}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its previous holder had just unlinked: a new one may be held
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
            self.fd = fd
            return self
        raise PkdCacheError(f"{self.flag} {self.shown}: could not lock {self.path} (other runs keep taking it)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking, so that a waiting run never locks a removed file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> Optional[dict]:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
