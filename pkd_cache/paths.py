"""Output folders: never overwrite silently."""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PkdCacheError


def prepare_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> Path:
    """Create `path`; an existing non-empty folder is refused unless `overwrite`, then emptied."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise PkdCacheError(f"{flag} {path} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise PkdCacheError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p
