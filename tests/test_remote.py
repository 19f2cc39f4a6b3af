"""Remote stores: fsspec URLs for --out and --store, a real S3-compatible server (moto, in its own process),
`pkd-cache serve` over HTTP with a token and no way out of its folder, and `pkd-cache ls`."""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

import pkd_cache
from pkd_cache.store.cache import entries
from pkd_cache.testing import cli_env, cli_in_process, show, wait_until


def batches_of(store, **kw):
    return [{k: v.numpy() for k, v in b.items()} for b in store.batches("train", 32, seed=1, **kw)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def dump_to(out, teacher_dir, data_dir):
    return cli_in_process("dump", "--teacher", teacher_dir, "--task", "sst2", "--data-dir", data_dir, "--out", out,
                          "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64")


def test_memory_url_round_trip(store_path, teacher_dir, data_dir):
    url = "memory://pkd-tests/sst2.zarr"
    p = dump_to(url, teacher_dir, data_dir)
    assert p.returncode == 0, show(p)
    remote, local = pkd_cache.open_store(url), pkd_cache.open_store(str(store_path))
    assert remote.info()["cache_key"] == local.info()["cache_key"]
    assert_same_batches(batches_of(remote, layers=[2]), batches_of(local, layers=[2]))
    p = dump_to(url, teacher_dir, data_dir)
    assert p.returncode == 0 and "cache hit" in p.stderr, show(p)
    p = cli_in_process("verify", url)
    assert p.returncode == 0 and p.stdout.startswith("ok:"), show(p)


# --- S3: moto's server in a subprocess, reached through s3fs like any S3-compatible endpoint -----------------------

def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_until(lambda: accepts_connections(port), "the moto server accepts connections", timeout=30, proc=server)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("pkd-bucket")
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
@pytest.mark.subprocess
def test_s3_dump_ls_distill_verify(s3, store_path, teacher_dir, data_dir, backbone_dir, tmp_path):
    url = "s3://pkd-bucket/team/sst2.zarr"
    p = dump_to(url, teacher_dir, data_dir)
    assert p.returncode == 0, show(p)
    assert s3.exists("pkd-bucket/team/sst2.zarr/checksums.json")
    assert_same_batches(batches_of(pkd_cache.open_store(url)), batches_of(pkd_cache.open_store(str(store_path))))

    p = cli_in_process("ls", "s3://pkd-bucket/team", "--json")
    assert p.returncode == 0, show(p)
    listed = json.loads(p.stdout)
    assert [s["name"] for s in listed] == ["sst2.zarr"] and listed[0]["complete"] and listed[0]["splits"]["train"] == 160

    p = cli_in_process("distill", "--store", url, "--student-layers", "2", "--student-init", backbone_dir,
                       "--output-dir", tmp_path / "student", "--max-steps", "3", "--batch-size", "16")
    assert p.returncode == 0, show(p)
    assert (tmp_path / "student" / "model.safetensors").is_file()

    key = "pkd-bucket/team/sst2.zarr/train/cls/c/0/1/0"
    data = bytearray(s3.cat_file(key))
    data[len(data) // 2] ^= 0x10
    s3.pipe_file(key, bytes(data))
    p = cli_in_process("verify", url)
    assert p.returncode == 1 and "train/cls chunk c/0/1/0 is corrupt" in p.stdout, show(p)


# --- HTTP: pkd-cache serve ------------------------------------------------------------------------------------

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory, store_path):
    from pkd_cache.commands.serve import make_server

    root = tmp_path_factory.mktemp("served")
    shutil.copytree(store_path, root / "sst2.zarr")
    (root / "private").mkdir()
    (root / "private" / "notes.txt").write_text("private notes")
    (root.parent / "outside.txt").write_text("secret")
    os.symlink(root.parent / "outside.txt", root / "sst2.zarr" / "escape")
    server = make_server(str(root), port=0, token=TOKEN, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    saved = os.environ.get("PKD_CACHE_TOKEN")
    os.environ["PKD_CACHE_TOKEN"] = TOKEN
    yield server
    server.shutdown()
    server.server_close()
    os.environ.pop("PKD_CACHE_TOKEN") if saved is None else os.environ.__setitem__("PKD_CACHE_TOKEN", saved)


def raw(server, path, method="GET", token=TOKEN, headers=None):
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.putrequest(method, path, skip_accept_encoding=True)  # sent as is: no client-side normalisation of `..`
    for k, v in ({"Authorization": f"Bearer {token}"} if token else {}).items() | (headers or {}).items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def test_serve_reads_like_local_and_lists(served, store_path, backbone_dir, tmp_path):
    url = f"{served.url}/sst2.zarr"
    assert_same_batches(batches_of(pkd_cache.open_store(url), layers=[1, 3]),
                        batches_of(pkd_cache.open_store(str(store_path)), layers=[1, 3]))
    p = cli_in_process("ls", served.url, "--json")
    assert p.returncode == 0, show(p)
    assert [s["name"] for s in json.loads(p.stdout)] == ["sst2.zarr"]
    p = cli_in_process("info", url)
    assert p.returncode == 0 and "sst2" in p.stdout, show(p)
    p = cli_in_process("verify", url)
    assert p.returncode == 0, show(p)
    p = cli_in_process("distill", "--store", url, "--student-layers", "2", "--student-init", backbone_dir,
                       "--output-dir", tmp_path / "student", "--max-steps", "2", "--batch-size", "16")
    assert p.returncode == 0, show(p)


def test_serve_needs_the_token(served, monkeypatch):
    assert raw(served, "/sst2.zarr/zarr.json", token=None)[0] == 401
    assert raw(served, "/sst2.zarr/zarr.json", token="wrong")[0] == 401
    assert raw(served, "/sst2.zarr/zarr.json")[0] == 200
    monkeypatch.delenv("PKD_CACHE_TOKEN")
    p = cli_in_process("ls", served.url)
    assert p.returncode == 2 and "PKD_CACHE_TOKEN" in p.stderr and len(p.stderr.splitlines()) == 1, show(p)


@pytest.mark.parametrize("path", ["/../outside.txt", "/%2e%2e/outside.txt", "/sst2.zarr/../../outside.txt",
                                  "/sst2.zarr/%2e%2e/%2e%2e/outside.txt", "/sst2.zarr/..%2f..%2foutside.txt",
                                  "/sst2.zarr/escape", "/private/notes.txt", "/sst2.zarr%00/zarr.json",
                                  "/sst2.zarr/..%5c..%5coutside.txt"])
def test_serve_never_leaves_its_folder(served, path):
    status, body = raw(served, path)
    assert status in (403, 404), (path, status, body)
    assert b"secret" not in body and b"private notes" not in body


def test_serve_is_read_only_and_honours_ranges(served):
    assert raw(served, "/sst2.zarr/zarr.json", method="PUT")[0] == 405
    assert raw(served, "/sst2.zarr/zarr.json", method="DELETE")[0] == 405
    full = raw(served, "/sst2.zarr/checksums.json")[1]
    status, part = raw(served, "/sst2.zarr/checksums.json", headers={"Range": "bytes=5-14"})
    assert status == 206 and part == full[5:15]
    p = cli_in_process("dump", "--teacher", "x", "--task", "sst2", "--out", f"{served.url}/new.zarr")
    assert p.returncode == 2 and "read-only" in p.stderr, show(p)


@pytest.mark.slow
def test_a_lock_on_s3_is_a_conditional_write(s3, monkeypatch):
    """Two writers that both saw no lock: the S3 conditional write (If-None-Match: *) lets exactly one create it.
    (moto honours the condition, as AWS S3 does; the loser is told who holds the store.)"""
    from pkd_cache.errors import StoreBusy
    from pkd_cache.store.journal import WriterLock
    from pkd_cache.store.location import Location

    url = "s3://pkd-bucket/locks/x.zarr"
    first, second = WriterLock(Location(url)), WriterLock(Location(url))
    first.acquire()
    monkeypatch.setattr(second, "check", lambda: None)  # it read "no lock" just before the first one wrote it
    with pytest.raises(StoreBusy, match=r"is being written by another dump \(pid \d+ on"):
        second.acquire()
    first.release()
    second.acquire()  # free again: it can take it now
    second.release()


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_dumps_of_one_key_on_an_s3_cache_run_the_teacher_once(s3, teacher_dir, data_dir):
    cache = "s3://pkd-bucket/team-cache"
    cmd = [sys.executable, "-m", "pkd_cache", "dump", "--teacher", str(teacher_dir), "--task", "sst2", "--data-dir",
           str(data_dir), "--cache", cache, "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64"]
    procs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    logs = [" ".join((out + err).split()) for out, err in outs]
    assert sum("wrote " in log for log in logs) == 1 and sum("cache hit:" in log for log in logs) == 1, logs
    (name, ident), = entries(cache)
    assert pkd_cache.open_store(f"{cache}/{name}").complete
