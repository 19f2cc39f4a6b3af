"""`pkd-cache gc`: the team cache's clean-up (store/gc.py does the survey, the plan and the removal), as lines for
people: what goes (or would, with `dry_run`), what stays and why, and what is freed."""
from __future__ import annotations

from typing import Iterator, Optional

from ..errors import PkdCacheError
from ..store.cache import cache_url
from ..store.describe import human_bytes
from ..store.gc import parse_duration, parse_size, plan, remove, survey


def gc(cache: Optional[str], older_than: Optional[str], max_size: Optional[str], grace: str = "1d",
       dry_run: bool = False) -> Iterator[str]:
    """Remove (or with `dry_run` list) the cache's stores unused for `older_than`, then the least recently used
    until it holds at most `max_size`; yields one line per store and a summary. Checks every input first."""
    url = cache_url(cache)
    if url is None:
        raise PkdCacheError("gc needs a cache (--cache URL or PKD_CACHE)")
    if older_than is None and max_size is None:
        raise PkdCacheError("gc needs --older-than or --max-size (or both); --dry-run shows what they would remove")
    age = parse_duration(older_than, "--older-than") if older_than is not None else None
    size = parse_size(max_size, "--max-size") if max_size is not None else None
    found = survey(url, parse_duration(grace, "--grace"))
    doomed = plan(found, age, size)
    verb = "would remove" if dry_run else "removing"
    for e in doomed:
        yield (f"{verb} {e.name}  (id {e.id}, {human_bytes(e.bytes)}, last used "
               f"{e.last_used.isoformat(timespec='minutes')})")
    if not dry_run:
        remove(url, doomed)
    kept = [e for e in found if e not in doomed]
    for e in kept:
        if e.busy:
            yield f"keeping {e.name}: {e.busy}"
    freed, left = sum(e.bytes for e in doomed), sum(e.bytes for e in kept)
    yield (f"{'would free' if dry_run else 'freed'} {human_bytes(freed)} ({len(doomed)} of {len(found)} stores); "
           f"the cache {'would hold' if dry_run else 'holds'} {human_bytes(left)}"
           + (f", over --max-size {max_size}: the rest is in use" if size is not None and left > size else ""))
