"""`pkd-cache serve DIR`: the stores in DIR over read-only HTTP, so a teammate can distill from `http://host:port/x.zarr`.

Only GET and HEAD, only files inside the stores of DIR (a folder directly under DIR whose `zarr.json` says it is a
pkd-cache store), never a path that resolves outside DIR (`..`, encoded or not, and symlinks are refused). With a
token, every request needs `Authorization: Bearer <token>`; clients send it from `PKD_CACHE_TOKEN`. `/` lists
the stores: JSON for `Accept: application/json` or `?format=json` (what `pkd-cache ls` reads), HTML otherwise.
Single byte ranges are honoured, as fsspec's HTTP reader may ask for them.
"""
from __future__ import annotations

import hmac
import html
import json
import mimetypes
import re
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from .errors import PkdCacheError
from .progress import log
from .store.describe import summary_from_meta

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def store_summary(path: Path) -> Optional[dict]:
    """Name, task, teacher, splits, size and completeness of the store at `path`, None if it is not one."""
    meta = _store_meta(path)
    if meta is None:
        return None
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return summary_from_meta(path.name, meta, size)


class StoreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, host: str, port: int, token: Optional[str], quiet: bool = False):
        self.root, self.token, self.quiet = root.resolve(), token, quiet
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: StoreServer
    server_version = "pkd-cache-serve"

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _refuse(self, *_args) -> None:
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET and HEAD only", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            log(f"{self.address_string()} {format % args}")

    def _respond(self, body: bool) -> None:
        if not self._authorised():
            return self._send_error(HTTPStatus.UNAUTHORIZED, "a bearer token is required",
                                    {"WWW-Authenticate": 'Bearer realm="pkd-cache"'})
        url = urllib.parse.urlsplit(self.path)
        target = self._resolve(url.path)
        if target is None:
            return
        if target == self.server.root:
            return self._listing(url.query, body)
        if target.is_dir():
            return self._directory(target, url.path, body)
        if target.is_file():
            return self._file(target, body)
        self._send_error(HTTPStatus.NOT_FOUND, "not found")

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _resolve(self, raw: str) -> Optional[Path]:
        """The file or folder for a request path, or None after answering 403/404 for anything outside the stores."""
        path = urllib.parse.unquote(raw)
        parts = [p for p in path.split("/") if p]
        if "\x00" in path or any(p in ("..", ".") or "\\" in p for p in parts):
            self._send_error(HTTPStatus.FORBIDDEN, "path outside the served folder")
            return None
        root = self.server.root
        if not parts:
            return root
        if any(p.startswith(".") for p in parts):  # temporary files of a dump in progress, dotfiles
            self._send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        target = (root / Path(*parts)).resolve()
        if root not in target.parents:
            self._send_error(HTTPStatus.FORBIDDEN, "path outside the served folder")
            return None
        store_dir = root / parts[0]
        if store_dir.resolve() != store_dir or _store_meta(store_dir) is None:
            self._send_error(HTTPStatus.NOT_FOUND, "not a store served here")
            return None
        return target

    def _listing(self, query: str, body: bool) -> None:
        stores = [s for s in (store_summary(p) for p in sorted(self.server.root.iterdir())
                              if p.is_dir() and not p.name.startswith(".")) if s]
        wants_json = "format=json" in query or "application/json" in self.headers.get("Accept", "")
        if wants_json:
            data = json.dumps({"stores": stores}, indent=1).encode()
            return self._send(HTTPStatus.OK, data, "application/json", body)
        rows = "".join(f'<tr><td><a href="/{html.escape(s["name"])}/">{html.escape(s["name"])}</a></td>'
                       f'<td>{html.escape(str(s["task"]))}</td><td>{html.escape(str(s["teacher"]))}</td>'
                       f'<td>{s["bytes"]:,}</td><td>{"yes" if s["complete"] else "NO"}</td></tr>' for s in stores)
        page = (f"<!doctype html><title>pkd-cache stores</title><h1>pkd-cache stores</h1><table><tr><th>store</th>"
                f"<th>task</th><th>teacher</th><th>bytes</th><th>complete</th></tr>{rows}</table>")
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8", body)

    def _directory(self, target: Path, raw: str, body: bool) -> None:
        """A plain link list (what fsspec's HTTP `ls` parses)."""
        base = raw if raw.endswith("/") else raw + "/"
        links = "".join(f'<a href="{html.escape(base + urllib.parse.quote(p.name))}{"/" if p.is_dir() else ""}">'
                        f"{html.escape(p.name)}</a><br>" for p in sorted(target.iterdir())
                        if not p.name.startswith(".") and not p.is_symlink())
        self._send(HTTPStatus.OK, f"<!doctype html>{links}".encode(), "text/html; charset=utf-8", body)

    def _file(self, target: Path, body: bool) -> None:
        size = target.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            a, b = match.groups()
            start, end = (int(a), min(int(b) if b else size - 1, size - 1)) if a else (max(0, size - int(b)), size - 1)
            if start > end or start >= size:
                return self._send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "bad range",
                                        {"Content-Range": f"bytes */{size}"})
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1 if size else 0
        self.send_response(status)
        kind = "application/json" if target.suffix == ".json" else (mimetypes.guess_type(target.name)[0]
                                                                     or "application/octet-stream")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and length:
            with open(target, "rb") as f:
                f.seek(start)
                left = length
                while left:
                    block = f.read(min(left, 1 << 20))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)

    def _send(self, status, data: bytes, kind: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_error(self, status, message: str, headers: Optional[dict] = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _store_meta(path: Path) -> Optional[dict]:
    """The metadata of the store at `path` (None if it is not one), without sizing it: called on every request."""
    from .store.location import Location
    from .store.writer import read_metadata

    return read_metadata(Location(str(path))) if path.is_dir() else None


def make_server(folder: str, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
                quiet: bool = False) -> StoreServer:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PkdCacheError(f"{folder} is not a directory")
    try:
        return StoreServer(root, host, port, token, quiet)
    except OSError as e:
        raise PkdCacheError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None) -> None:
    """Serve until interrupted."""
    server = make_server(folder, host, port, token)
    stores = [p.name for p in sorted(server.root.iterdir()) if p.is_dir() and _store_meta(p)]
    log(f"serving {len(stores)} store(s) from {server.root} at {server.url}/ "
        f"({'bearer token required' if token else 'no token: anyone who can reach this port can read them'})")
    for name in stores:
        log(f"  pkd-cache distill --store {server.url}/{name} ...")
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log("warning: listening beyond this machine without --token")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
