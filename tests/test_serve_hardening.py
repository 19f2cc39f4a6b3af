"""`pkd-cache serve` against hostile folders and clients: symlinks anywhere in a path are never followed, the
listing shows only what can be served, malformed or overlong paths get a 4xx (never a dropped connection or a
traceback), idle connections are closed and the number of connections is capped.

The stores here are minimal fakes (a `zarr.json` with pkd-cache attributes): serve only reads the metadata, so no
teacher has to run. Every socket has a timeout and every loop a deadline; servers listen on 127.0.0.1 only.
"""
import contextlib
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from pkd_cache.errors import PkdCacheError
from pkd_cache.testing import wait_until

META = {"zarr_format": 3, "node_type": "group",
        "attributes": {"format": "pkd-cache", "task": {"name": "sst2"}, "complete": True}}
SECRET = "top secret"


@pytest.fixture()
def root(tmp_path):
    """DIR with one real store and every kind of symlink the issue lists, all pointing at folders under DIR."""
    d = tmp_path / "stores"
    (d / "a.zarr" / "sub").mkdir(parents=True)
    (d / "a.zarr" / "zarr.json").write_text(json.dumps(META))
    (d / "a.zarr" / "sub" / "real.txt").write_text("real")
    (d / "private").mkdir()
    (d / "private" / "secret.txt").write_text(SECRET)
    os.symlink("../private", d / "a.zarr" / "privdir")  # a folder inside a store -> another folder under DIR
    os.symlink("../private/secret.txt", d / "a.zarr" / "link.txt")  # a file
    os.symlink("../../private", d / "a.zarr" / "sub" / "deep")  # deeper down
    os.symlink("a.zarr", d / "b.zarr")  # a store folder that is itself a symlink
    (d / "c.zarr").mkdir()  # a real folder whose metadata file is a symlink
    os.symlink("../a.zarr/zarr.json", d / "c.zarr" / "zarr.json")
    (d / "c.zarr" / "secret.txt").write_text(SECRET)
    os.mkfifo(d / "a.zarr" / "fifo")  # would hang a reader that opened it blocking
    (d / "t" / "n.zarr").mkdir(parents=True)  # a team cache's <task>/<entry>: served one folder down
    (d / "t" / "n.zarr" / "zarr.json").write_text(json.dumps(META))
    os.symlink("t", d / "tl")  # a task folder that is a symlink: nothing behind it
    os.symlink("../a.zarr", d / "t" / "s.zarr")  # a symlinked store inside a task folder
    return d


@contextlib.contextmanager
def running(root, **kw):
    from pkd_cache.commands.serve import make_server

    server = make_server(str(root), port=0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def served(root):
    with running(root, quiet=True) as server:
        yield server


def get(server, path, method="GET", headers=None):
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)  # sent as is, no normalisation
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def connect(server) -> socket.socket:
    s = socket.create_connection(server.server_address[:2], timeout=10)
    s.settimeout(10)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (the socket timeout bounds the wait)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("path", ["/a.zarr/privdir/secret.txt", "/a.zarr/privdir/", "/a.zarr/link.txt",
                                  "/a.zarr/sub/deep/secret.txt", "/a.zarr/sub/deep", "/b.zarr/zarr.json",
                                  "/b.zarr/sub/real.txt", "/b.zarr/", "/c.zarr/zarr.json", "/c.zarr/secret.txt",
                                  "/private/secret.txt", "/a.zarr/fifo", "/a.zarr/%70rivdir/secret.txt",
                                  "/tl/n.zarr/zarr.json", "/t/s.zarr/zarr.json", "/t/s.zarr/sub/real.txt",
                                  "/-/tl/n.zarr", "/-/t/s.zarr", "/t/zarr.json", "/t/"])
@pytest.mark.slow
def test_no_symlink_is_ever_followed(served, path):
    for method in ("GET", "HEAD"):
        status, body = get(served, path, method)
        assert status in (403, 404), (path, method, status, body)
        assert SECRET.encode() not in body
    assert get(served, "/a.zarr/sub/real.txt") == (200, b"real")  # the real files next to them still are served
    assert get(served, "/t/n.zarr/zarr.json") == (200, json.dumps(META).encode())


def test_what_is_listed_is_what_is_served(served):
    from pkd_cache.store.listing import list_stores

    status, body = get(served, "/?format=json")
    names = [s["name"] for s in json.loads(body)["stores"]]
    # not b.zarr (a symlink), not c.zarr (symlinked metadata), not tl/n.zarr (behind a symlinked folder), not
    # t/s.zarr (a symlink); t/n.zarr is a store one real folder down, as in a team cache
    assert status == 200 and names == ["a.zarr", "t/n.zarr"]
    assert [s["name"] for s in list_stores(served.url)] == names  # what `pkd-cache ls URL` prints
    html = get(served, "/")[1].decode()
    assert "a.zarr" in html and "t/n.zarr" in html and "b.zarr" not in html and "c.zarr" not in html
    for name in names:
        assert get(served, f"/{name}/zarr.json")[0] == 200
    listing = get(served, "/a.zarr/")[1].decode()
    assert "zarr.json" in listing and "sub/" in listing
    assert "privdir" not in listing and "link.txt" not in listing and "fifo" not in listing
    assert "deep" not in get(served, "/a.zarr/sub/")[1].decode()
    size = json.loads(body)["stores"][0]["bytes"]
    assert size == len(json.dumps(META)) + len("real")  # the symlinked secret is not counted either


BAD_PATHS = ["/" + "a" * 300, "/a.zarr/" + "b" * 256, "/a.zarr/" + "%41" * 300, "/a.zarr/" + "é" * 200,
             "/" + "x/" * 3000, "*", "http://evil.example/a.zarr/zarr.json", "a.zarr/zarr.json", "/[/x]",
             "/a.zarr/[bold]x", "/%ff%fe.zarr/zarr.json", "/a.zarr/%ff", "/a.zarr/%00", "/a.zarr/zarr.json%00",
             "/a.zarr/sub/real.txt/x", "/a.zarr/%0d%0aSet-Cookie:%20x", "/a.zarr/%", "/a.zarr/%zz", "/%2e%2e",
             "/a.zarr/..%2f..%2fprivate/secret.txt", "/a.zarr/\x7f"]


def test_malformed_and_overlong_paths_get_a_4xx_and_no_traceback(root, capfd):
    with running(root, quiet=False) as server:  # not quiet: the log is part of what is checked
        for path in BAD_PATHS:
            s = connect(server)
            s.sendall(b"GET " + path.encode("utf-8") + b" HTTP/1.0\r\n\r\n")  # raw bytes: nothing normalised
            reply = read_all(s)
            s.close()
            status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None
            assert status is not None and 400 <= status < 500, (path, reply[:200])
            assert SECRET.encode() not in reply
        for rng in ("bytes=0-" + "9" * 5000, "bytes=" + "9" * 30 + "-", "bytes=-" + "9" * 5000, "bytes=x-y"):
            status, body = get(server, "/a.zarr/sub/real.txt", headers={"Range": rng})
            assert (status, body) in ((200, b"real"), (416, body)), (rng, status)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    assert "414" in err and "\\x7f" in err and "\x7f" not in err  # logged, with control characters escaped


def test_overlong_names_get_414(served):
    assert get(served, "/" + "a" * 300)[0] == 414
    assert get(served, "/a.zarr/" + "b" * 256)[0] == 414
    assert get(served, "/" + "x/" * 3000)[0] == 414
    assert get(served, "/a.zarr/" + "b" * 255)[0] == 404  # a legal name that is not there


def test_idle_connections_are_closed(root):
    with running(root, quiet=True, idle_timeout=0.5) as server:
        silent, half = connect(server), connect(server)
        half.sendall(b"GET /a.zarr/zarr.json HTTP/1.0\r\n")  # headers never finished
        # closed by the server: were it not, read_all's socket timeout (10 s) would raise instead
        assert read_all(silent) == b"" and read_all(half) == b""
        silent.close()
        half.close()
        assert get(server, "/a.zarr/zarr.json")[0] == 200  # and the server still answers


def test_connections_are_capped_with_a_503(root):
    with running(root, quiet=True, idle_timeout=30, max_connections=2) as server:
        idle = [connect(server), connect(server)]
        wait_until(lambda: not server._slots._value, "both connections accepted, each holding a slot", timeout=10)
        extra = connect(server)  # turned away at once, before it even sends a request
        reply = read_all(extra)
        extra.close()
        assert reply.startswith(b"HTTP/1.0 503") and b"Retry-After" in reply, reply[:200]
        assert get(server, "/a.zarr/zarr.json")[0] == 503  # a client that sends first sees the 503 too
        idle[0].close()
        wait_until(lambda: get(server, "/a.zarr/zarr.json")[0] == 200, "the freed slot takes a new connection",
                   timeout=10)
        idle[1].close()


@pytest.mark.parametrize("kw", [{"idle_timeout": 0}, {"idle_timeout": -1}, {"max_connections": 0}])
def test_bad_limits_are_refused(root, kw):
    from pkd_cache.commands.serve import make_server

    with pytest.raises(PkdCacheError, match="must be"):
        make_server(str(root), port=0, **kw)


@pytest.mark.subprocess
def test_the_cli_banner_lists_only_served_stores_and_logs_no_traceback(root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "pkd_cache", "serve", str(root), "--port", "0"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = b""
    try:
        deadline = time.monotonic() + 60
        while b"distill --store" not in log and time.monotonic() < deadline and p.poll() is None:
            if select.select([p.stderr], [], [], 0.5)[0]:
                log += os.read(p.stderr.fileno(), 65536)
        text = log.decode()
        assert "serving 2 store(s)" in text and "/a.zarr" in text and "b.zarr" not in text, text
        port = int(text.split("127.0.0.1:", 1)[1].split("/", 1)[0])
        for path in ("/" + "a" * 300, "/[/x]", "/a.zarr/privdir/secret.txt", "/a.zarr/%ff"):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", path)
            assert 400 <= c.getresponse().status < 500, path
            c.close()
    finally:
        p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
        p.kill() if p.poll() is None else None
        log += p.stderr.read()
        p.stderr.close()
    assert "Traceback" not in log.decode(), log.decode()[-2000:]
