"""`pkd-cache serve DIR`: the stores in DIR over read-only HTTP, so a teammate can distill from
`http://host:port/x.zarr`.

Only GET and HEAD, only regular files and folders inside the stores of DIR (a real folder directly under DIR whose
metadata says it is a pkd-cache store, or one such a folder down: a team cache's `<task>/<entry>`, as
`http://host:port/sst2/<entry>.zarr`; serve_stores.py). Nothing outside DIR is ever served: `..` (encoded or not) gets 403, and a
symlink anywhere in the path (the store folder itself, a folder inside it, the file) is never followed: 404. The
root listing, `pkd-cache ls` and the start-up banner leave symlinked stores out, so what is listed is what is served.
A malformed request path gets 400, an overlong one (a name over 255 bytes, a path over 4096) 414.

With a token, every request needs `Authorization: Bearer <token>`; clients send it from `PKD_CACHE_TOKEN`. `/` lists
the stores: JSON for `Accept: application/json` or `?format=json` (what `pkd-cache ls` reads), HTML otherwise.
Single byte ranges are honoured, as fsspec's HTTP reader may ask for them.

Connections are bounded: a connection idle for `idle_timeout` seconds (default 60) is closed, and at most
`max_connections` (default 128) are handled at once; one more is answered at once with 503 and a `Retry-After`
header and closed, without waiting and without a thread, so a flood of idle sockets cannot exhaust the server.
"""
from __future__ import annotations

import hmac
import html
import json
import mimetypes
import os
import re
import socket
import stat
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from rich.markup import escape

from ..errors import PkdCacheError
from ..progress import log
from .serve_pages import Verifier, index_html, store_detail, store_html
from .serve_stores import served_stores, store_depth, store_summary

_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # 18 digits: int() never sees a 5,000-digit number
_MAX_NAME, _MAX_PATH = 255, 4096  # bytes, as in NAME_MAX and PATH_MAX on Linux
# Request lines are attacker-chosen: control characters are escaped before they reach the log.
_CONTROL = str.maketrans({c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]})
# Never follow a symlink, never block on a FIFO, never leak the descriptor into a child.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class StoreServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # Ctrl-C and server_close() do not wait for slow clients
    request_queue_size = 64

    def __init__(self, root: Path, host: str, port: int, token: Optional[str], quiet: bool = False,
                 idle_timeout: float = 60.0, max_connections: int = 128):
        self.root, self.token, self.quiet = root.resolve(), token, quiet
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.verifier = Verifier(_verify)  # the pages' "verified" column, one background check per store
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            return self._turn_away(request, client_address)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back (serve_forever logs and closes)
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket, client_address) -> None:
        """503 on the accepting thread: non-blocking, so a full server keeps accepting (and refusing) promptly."""
        body = json.dumps({"error": f"server busy: {self.max_connections} connections open; retry"}).encode()
        reply = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            request.setblocking(False)
            try:  # read what already came, so that closing sends FIN rather than a reset that could eat the 503
                request.recv(65536)
            except OSError:
                pass
            request.send(reply)  # a few hundred bytes always fit an empty socket buffer
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
        if not self.quiet:
            log(f"{client_address[0]} turned away: {self.max_connections} connections open")

    def handle_error(self, request, client_address) -> None:
        """One log line, never a traceback: a client that hangs up mid-transfer is not a server bug."""
        error = sys.exc_info()[1]
        if not self.quiet and not isinstance(error, (ConnectionError, TimeoutError)):
            log(escape(f"{client_address[0]} request failed: {type(error).__name__}: {error}".translate(_CONTROL)))


class _Handler(BaseHTTPRequestHandler):
    server: StoreServer
    server_version = "pkd-cache-serve"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # StreamRequestHandler.setup puts it on the socket
        super().setup()

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _refuse(self, *_args) -> None:
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET and HEAD only", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:  # escaped: a path like /[/x] is rich markup, and would crash the log line
            log(escape(f"{self.address_string()} {format % args}".translate(_CONTROL)))

    def _respond(self, body: bool) -> None:
        if not self._authorised():
            return self._send_error(HTTPStatus.UNAUTHORIZED, "a bearer token is required",
                                    {"WWW-Authenticate": 'Bearer realm="pkd-cache"'})
        raw, _, query = self.path.partition("#")[0].partition("?")
        parts = self._parts(raw)
        if parts is None:
            return
        if not parts:
            return self._listing(query, body)
        if parts[0] == "-" and len(parts) in (2, 3):  # a store's page for people (serve_pages.py)
            return self._store_page(parts[1:], query, body)
        try:
            fd = self._open(parts)
        except OSError:  # missing, a symlink (ELOOP), a file where a folder was expected, unreadable...
            return self._send_error(HTTPStatus.NOT_FOUND, "not found")
        if fd is None:
            return
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                return self._directory(fd, raw, body)
            if stat.S_ISREG(mode):
                return self._file(fd, parts[-1], body)
            self._send_error(HTTPStatus.NOT_FOUND, "not found")  # FIFOs, sockets, devices
        finally:
            os.close(fd)

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _parts(self, raw: str) -> Optional[list[str]]:
        """The names in a request path, or None after answering 400/403/404/414 for one that cannot be served."""
        if not raw.startswith("/"):  # `*`, absolute URIs (`http://...`): not a path of this server
            self._send_error(HTTPStatus.BAD_REQUEST, "the request path must start with /")
            return None
        # http.server decoded the request line as latin-1: back to the bytes sent, %-decoded, named as the OS does
        path = os.fsdecode(urllib.parse.unquote_to_bytes(raw.encode("latin-1", errors="replace")))
        parts = [p for p in path.split("/") if p]
        if "\x00" in path or any(p in ("..", ".") or "\\" in p for p in parts):
            self._send_error(HTTPStatus.FORBIDDEN, "path outside the served folder")
            return None
        sizes = [len(os.fsencode(p)) for p in parts]
        if sum(sizes) + len(sizes) > _MAX_PATH or any(n > _MAX_NAME for n in sizes):
            self._send_error(HTTPStatus.REQUEST_URI_TOO_LONG,
                             f"path too long (names up to {_MAX_NAME} bytes, paths up to {_MAX_PATH})")
            return None
        if any(p.startswith(".") for p in parts):  # temporary files of a dump in progress, dotfiles
            self._send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        return parts

    def _open(self, parts: list[str]) -> Optional[int]:
        """A descriptor for root/parts, each name opened relative to its parent's descriptor with O_NOFOLLOW,
        so no symlink is followed, including one swapped in while the request runs. None after a 404."""
        if store_depth(self.server.root, parts) is None:
            self._send_error(HTTPStatus.NOT_FOUND, "not a store served here")
            return None
        fd = os.open(self.server.root, _OPEN_FLAGS | getattr(os, "O_DIRECTORY", 0))
        try:
            for part in parts:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    raise NotADirectoryError(part)
                child = os.open(part, _OPEN_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _wants_json(self, query: str) -> bool:
        return "format=json" in query or "application/json" in self.headers.get("Accept", "")

    def _base(self) -> str:
        """This server's address as the client reached it (for the `distill --store <url>` lines)."""
        host = self.headers.get("Host") or "%s:%s" % self.server.server_address[:2]
        return f"http://{host}"

    def _listing(self, query: str, body: bool) -> None:
        root, names = self.server.root, served_stores(self.server.root)
        stores = [s for s in (store_summary(root / n, n) for n in names) if s]
        verified = {n: self.server.verifier.status(root / n) for n in names}
        for s in stores:
            s["verified"] = verified.get(s["name"]) if s["complete"] else "unfinished"
        if self._wants_json(query):
            data = json.dumps({"stores": stores}, indent=1).encode()
            return self._send(HTTPStatus.OK, data, "application/json", body)
        page = index_html(stores, self._base(), verified)
        self._send(HTTPStatus.OK, page.encode(errors="surrogateescape"), "text/html; charset=utf-8", body)

    def _store_page(self, parts: list[str], query: str, body: bool) -> None:
        path, name = self.server.root.joinpath(*parts), "/".join(parts)
        summary = store_summary(path, name) if store_depth(self.server.root, parts) == len(parts) else None
        if summary is None:
            return self._send_error(HTTPStatus.NOT_FOUND, "not a store served here")
        try:
            detail = store_detail(path, summary, self.server.verifier.status(path))
        except PkdCacheError as e:
            return self._send_error(HTTPStatus.CONFLICT, " ".join(str(e).split())[:300])
        if self._wants_json(query):
            return self._send(HTTPStatus.OK, json.dumps(detail, indent=1).encode(), "application/json", body)
        page = store_html(detail, self._base())
        self._send(HTTPStatus.OK, page.encode(errors="surrogateescape"), "text/html; charset=utf-8", body)

    def _directory(self, fd: int, raw: str, body: bool) -> None:
        """A plain link list (what fsspec's HTTP `ls` parses) of the folder's regular files and real subfolders."""
        base = raw if raw.endswith("/") else raw + "/"
        with os.scandir(fd) as it:  # scandir works on a duplicate: `fd` stays open for the caller to close
            entries = sorted((e for e in it if not e.name.startswith(".") and not e.is_symlink()),
                             key=lambda e: e.name)
        links = "".join(f'<a href="{html.escape(base + urllib.parse.quote(e.name, errors="surrogateescape"))}'
                        f'{"/" if e.is_dir(follow_symlinks=False) else ""}">{html.escape(e.name)}</a><br>'
                        for e in entries if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False))
        self._send(HTTPStatus.OK, f"<!doctype html>{links}".encode(errors="surrogateescape"),
                   "text/html; charset=utf-8", body)

    def _file(self, fd: int, name: str, body: bool) -> None:
        size = os.fstat(fd).st_size
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
        kind = "application/json" if name.endswith(".json") else (mimetypes.guess_type(name)[0]
                                                                   or "application/octet-stream")
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and length:
            os.set_blocking(fd, True)
            offset, left = start, length
            while left:
                block = os.pread(fd, min(left, 1 << 20), offset)
                if not block:  # the file shrank under us: the short body tells the client
                    break
                self.wfile.write(block)
                offset, left = offset + len(block), left - len(block)

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


def _verify(path: str):
    from ..store.verify import verify_store

    return verify_store(path)


def make_server(folder: str, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
                quiet: bool = False, idle_timeout: float = 60.0, max_connections: int = 128) -> StoreServer:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PkdCacheError(f"{folder} is not a directory")
    if not 0 < idle_timeout < float("inf"):
        raise PkdCacheError(f"--idle-timeout must be a finite number of seconds > 0, got {idle_timeout}")
    if max_connections < 1:
        raise PkdCacheError(f"--max-connections must be >= 1, got {max_connections}")
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise PkdCacheError("pkd-cache serve needs a POSIX system (openat with O_NOFOLLOW); push the stores to a "
                            "bucket instead")
    try:
        return StoreServer(root, host, port, token, quiet, idle_timeout, max_connections)
    except OSError as e:
        raise PkdCacheError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def serve(folder: str, host: str = "127.0.0.1", port: int = 8000, token: Optional[str] = None,
          idle_timeout: float = 60.0, max_connections: int = 128) -> None:
    """Serve until interrupted."""
    server = make_server(folder, host, port, token, idle_timeout=idle_timeout, max_connections=max_connections)
    stores = served_stores(server.root)
    log(escape(f"serving {len(stores)} store(s) from {server.root} at {server.url}/ "
               f"({'bearer token required' if token else 'no token: anyone who can reach this port can read them'})"))
    for name in stores:
        log(escape(f"  pkd-cache distill --store {server.url}/{name} ..."))
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log("warning: listening beyond this machine without --token")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
