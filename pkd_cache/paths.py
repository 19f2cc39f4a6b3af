"""Output folders: never overwrite silently."""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import PkdCacheError


def check_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> Path:
    """Refuse an existing non-empty folder unless `overwrite`; touches nothing (call before expensive work)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise PkdCacheError(f"{flag} {path} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise PkdCacheError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace it")
    return p


def prepare_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> Path:
    """Create `path` empty (checked as `check_output_dir`); call once the inputs have loaded, so that a
    failing run does not destroy the previous output."""
    p = check_output_dir(path, overwrite, flag)
    if p.is_dir() and any(p.iterdir()):
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p
