"""`pkd-cache ls URL`: the stores under a local folder, a bucket prefix or a `pkd-cache serve` address."""
from __future__ import annotations

import json
from typing import Optional

from rich.console import Console
from rich.table import Table

from ..errors import PkdCacheError
from .describe import human_bytes, summary_from_meta, summary_holds, summary_splits
from .registry import read_metadata
from .location import Location, is_url


def list_stores(url: str, storage_options: Optional[dict] = None) -> list[dict]:
    """One summary per store directly under `url` (or `url` itself, when it is a store)."""
    location = Location(url, storage_options)
    if location.read_only:  # http(s): a `pkd-cache serve` lists its stores as JSON
        return _served(location)
    if not location.exists():
        raise PkdCacheError(f"{url} does not exist")
    own = _meta(location, "")
    if own is not None:
        return [summary_from_meta(url.rstrip("/").rsplit("/", 1)[-1], own, location.size())]
    out = []
    for name in _children(location):
        meta = _meta(location, name)
        if meta is not None:
            out.append(summary_from_meta(name, meta, location.child(name).size()))
            continue
        inner = location.child(name)  # a task folder of a cache (store/cache.py): <task>/<teacher>-<id>.<format>
        for entry in _children(inner):
            meta = _meta(inner, entry)
            if meta is not None:
                out.append(summary_from_meta(f"{name}/{entry}", meta, inner.child(entry).size()))
    return out


def _meta(location: Location, name: str) -> Optional[dict]:
    return read_metadata(location.child(name) if name else location)


def _children(location: Location) -> list[str]:
    if not location.url:
        return sorted(p.name for p in location.local.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries = location.fs.ls(location.root, detail=True)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def _served(location: Location) -> list[dict]:
    base = location.path.rstrip("/")
    try:
        data = json.loads(location.fs.cat_file(f"{base}/?format=json"))
        return list(data["stores"])
    except FileNotFoundError:
        raise PkdCacheError(f"{location.path} lists no stores (is it a `pkd-cache serve` address?)") from None
    except (ValueError, KeyError, TypeError):
        raise PkdCacheError(f"{location.path} did not answer with a pkd-cache store list") from None
    except Exception as e:
        status = getattr(e, "status", None)
        if status == 401:
            raise PkdCacheError(f"{location.path} refused the request ({status}): set PKD_CACHE_TOKEN to the "
                                f"server's token") from e
        if status in (403, 503):
            raise PkdCacheError(f"{location.path} refused the request ({status}: "
                                f"{'forbidden path' if status == 403 else 'server busy, retry in a moment'})") from e
        raise


def print_stores(url: str, stores: list[dict], console: Optional[Console] = None) -> None:
    """A table on a wide terminal; on one narrower than 120 columns, two lines per store, so that nothing is cut
    (a table of ten columns cannot be read at 80)."""
    from rich.table import Column

    console = console or Console()
    if console.width < 120:
        return _print_narrow(url, stores, console)
    unfinished = any(not s.get("complete") for s in stores)
    table = Table(Column("store", no_wrap=True), "id", "task", "teacher", "splits", "holds", "size", "created", "by",
                  *(["complete"] if unfinished else []), title=f"stores in {url}" if is_url(url) or stores else None)
    for s in stores:
        splits = summary_splits(s)
        teacher = str(s.get("teacher") or "?").rstrip("/").rsplit("/", 1)[-1]  # the full name is in `info`
        created = str(s.get("created_at") or "-").replace("T", " ")[:16]
        table.add_row(s["name"], str(s.get("id") or "-"), str(s.get("task")),
                      f"{teacher} ({s.get('layers')}x{s.get('hidden')})", splits, summary_holds(s),
                      human_bytes(s["bytes"]) if s.get("bytes") is not None else "?", created,
                      str(s.get("created_by") or "-"),
                      *(["yes" if s.get("complete") else "NO"] if unfinished else []))
    console.print(table)


def _print_narrow(url: str, stores: list[dict], console: Console) -> None:
    from rich.markup import escape

    console.print(f"[bold]{len(stores)} store(s) in {escape(url)}[/bold]")
    for s in stores:
        teacher = str(s.get("teacher") or "?").rstrip("/").rsplit("/", 1)[-1]
        splits = summary_splits(s)
        created = str(s.get("created_at") or "-").replace("T", " ")[:16]
        size = human_bytes(s["bytes"]) if s.get("bytes") is not None else "?"
        state = "" if s.get("complete") else "  [red]UNFINISHED[/red]"
        console.print(f"[bold]{escape(s['name'])}[/bold]  id {s.get('id') or '-'}  {created} by "
                      f"{escape(str(s.get('created_by') or '-'))}{state}", overflow="fold")
        console.print(escape(f"  {s.get('task')} | {teacher} ({s.get('layers')}x{s.get('hidden')}) | "
                             f"{summary_holds(s)} | {size} | {splits}"), overflow="fold")
