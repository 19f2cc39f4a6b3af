"""The `pkd-cache` commands that look at stores rather than train: verify, info, ls, gc, serve. Plain functions with
typer options; cli.py registers them (with its one-line error handling)."""
from __future__ import annotations

import json
from typing import Optional

import typer

from .cli_options import AllowNoChecksums, CacheOpt, _fail, _in_cache


def verify(store: str = typer.Argument(..., help="Path or URL of a store, or its id in the cache."),
           allow_no_checksums: bool = AllowNoChecksums, cache: Optional[str] = CacheOpt):
    """Check a store: complete, consistent metadata, every chunk present and matching its dump-time checksum.

    Exit 0 when the store is sound, 1 when it has problems (each printed on its own line), 2 when it cannot be
    opened as a store at all.
    """
    from .store.verify import verify_store

    store = _in_cache(store, cache)
    report = verify_store(store, allow_no_checksums=allow_no_checksums)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    for problem in report.problems:
        typer.echo(f"problem: {problem}")
    if not report.ok:
        _fail(f"store {store} has {len(report.problems)} problem(s)", 1)
    checked = "match their checksums" if report.checksummed else "decode"
    typer.echo(f"ok: {store}: complete, metadata consistent, {report.chunks:,} chunks "
               f"({report.bytes / 2**20:,.1f} MiB decoded) {checked}")


def info(store: str = typer.Argument(..., help="Path or URL of a store, or its id in the cache."),
         as_json: bool = typer.Option(False, "--json", help="Print the raw metadata as JSON."),
         cache: Optional[str] = CacheOpt):
    """Describe a store: teacher, tokenizer, task, splits, sizes, completeness."""
    from .store import open_store
    from .store.describe import print_info

    s = open_store(_in_cache(store, cache), require_complete=False)
    if as_json:
        typer.echo(json.dumps(s.info(), indent=2))
    else:
        print_info(s)


def ls(url: Optional[str] = typer.Argument(None, help="A folder, bucket prefix (s3://, gs://) or `pkd-cache serve` "
                                                      "address (default: the cache, else the current folder)."),
       as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
       cache: Optional[str] = CacheOpt):
    """List the stores under a folder or URL: id, task, teacher, splits, size, completeness, who made them."""
    from .store.cache import cache_url
    from .store.listing import list_stores, print_stores

    url = url or cache_url(cache) or "."

    stores = list_stores(url)
    if as_json:
        typer.echo(json.dumps(stores, indent=2))
    elif not stores:
        typer.echo(f"no pkd-cache stores in {url}")
    else:
        print_stores(url, stores)


def gc(older_than: Optional[str] = typer.Option(None, "--older-than", help="Remove stores unused for this long "
                                                                             "(90d, 12h, 2w)."),
       max_size: Optional[str] = typer.Option(None, "--max-size", help="Remove the least recently used stores until "
                                                                       "the cache holds at most this (2TB, 500GB)."),
       grace: str = typer.Option("1d", "--grace", help="Never remove a store used within this long."),
       dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
       cache: Optional[str] = CacheOpt):
    """Remove stores from the team cache by age since last use, or least recently used first until it fits."""
    from .commands.gc import gc as run

    for line in run(cache, older_than, max_size, grace, dry_run):
        typer.echo(line)


def serve(folder: str = typer.Argument(..., help="Folder whose stores are served."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
          port: int = typer.Option(8000, "--port", help="Port to listen on."),
          token: Optional[str] = typer.Option(None, "--token", envvar="PKD_CACHE_SERVE_TOKEN",
                                              help="Require `Authorization: Bearer <token>` (clients set "
                                                   "PKD_CACHE_TOKEN)."),
          idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="Close a connection idle this many "
                                                                          "seconds."),
          max_connections: int = typer.Option(128, "--max-connections", help="Connections served at once; one "
                                                                             "more is answered 503 and closed.")):
    """Serve the stores in FOLDER over read-only HTTP: `distill --store http://host:port/<store>` reads them."""
    from .commands.serve import serve as run

    run(folder, host, port, token, idle_timeout=idle_timeout, max_connections=max_connections)
