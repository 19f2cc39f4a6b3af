"""What `pkd-cache serve DIR` serves: the stores directly under DIR, and those one real folder down (a team
cache's `<task>/<entry>`, store/cache.py). A symlink is never followed, so nothing behind one is listed or served."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Optional

from ..store.describe import summary_from_meta


def store_summary(path: Path, name: str) -> Optional[dict]:
    """Name, task, teacher, splits, size and completeness of the store at `path` (served as `name`), None if it is
    not one served here."""
    meta = _store_meta(path)
    if meta is None:
        return None
    size = 0
    for folder, _dirs, files in os.walk(path):  # os.walk does not descend into symlinked folders
        for file in files:
            with contextlib.suppress(OSError):  # gone meanwhile: a dump in progress renames its temporary files
                st = os.lstat(os.path.join(folder, file))
                size += st.st_size if stat.S_ISREG(st.st_mode) else 0  # a symlinked file is not served: not counted
    return summary_from_meta(name, meta, size)


def served_stores(root: Path) -> list[str]:
    """The names, relative to `root` and in order, of the stores requests can reach (the listing and the banner):
    each store directly under `root`, and each store in a real folder directly under it (a team cache's
    `<task>/<entry>`, store/cache.py)."""
    names = []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if _store_meta(p) is not None:
            names.append(p.name)
        elif _real_dir(p):
            with contextlib.suppress(OSError):
                names += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())
                          if not q.name.startswith(".") and _store_meta(q) is not None]
    return names


def store_depth(root: Path, parts: list[str]) -> Optional[int]:
    """How many leading names of a request path name a store served here: 1 (a store directly under `root`), 2 (a
    store in a real folder under it), None (neither)."""
    if _store_meta(root / parts[0]) is not None:
        return 1
    if len(parts) >= 2 and _real_dir(root / parts[0]) and _store_meta(root / parts[0] / parts[1]) is not None:
        return 2
    return None


def _real_dir(path: Path) -> bool:
    """A folder, not a symlink to one (a symlink is never followed, so what is behind it is never listed)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _store_meta(path: Path) -> Optional[dict]:
    """The metadata of the store at `path`, None if it is not one or is not served (a symlinked store folder or
    metadata file: requests never follow symlinks, so neither does the listing). Called on every request."""
    from ..store.registry import meta_files, read_metadata
    from ..store.location import Location

    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        for name in meta_files():  # a symlink is not served; a FIFO would hang the reader
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(path / name).st_mode):
                    return None
    except OSError:  # a name too long, a folder we may not read
        return None
    return read_metadata(Location(str(path)))
