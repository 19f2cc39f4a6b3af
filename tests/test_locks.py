"""One dump per store: a live holder is named to whoever loses, and a dead one (or a reused pid) is taken over."""
import datetime as dt
import json
import os
import socket
import subprocess
import sys

import pytest

from pkd_cache.errors import PkdCacheError
from pkd_cache.store import journal
from pkd_cache.store.journal import LOCK, WriterLock, process_start
from pkd_cache.store.location import Location
from pkd_cache.testing import cli_in_process, show, tree_digest, wait_until

pytestmark = pytest.mark.subprocess  # most tests start a process to stand for another dump


def live_process(executable=sys.executable) -> subprocess.Popen:
    """A process that lives until killed (it waits for input that never comes)."""
    return subprocess.Popen([str(executable), "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


@pytest.fixture
def sleeper():
    """A live process of this host that is not this one (what another dump looks like to the lock)."""
    proc = live_process()
    yield proc
    proc.kill()
    proc.communicate()  # reaps it and closes its stdin


def write_lock(store, pid, proc_start="auto", started="2024-01-02T03:04:05+00:00"):
    record = {"host": socket.gethostname(), "pid": pid, "started": started}
    if proc_start == "auto":
        proc_start = process_start(pid)
    if proc_start is not None:
        record["proc_start"] = proc_start
    (store / ".pkd_cache").mkdir(parents=True, exist_ok=True)
    (store / LOCK).write_text(json.dumps(record))
    return record


def dump_args(teacher, data, out, *extra):
    return ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out),
            "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64", "--max-examples", "64", *extra]


def test_the_lock_records_the_process_start_time(tmp_path):
    lock = WriterLock(Location(str(tmp_path / "s.zarr")))
    lock.acquire()
    record = json.loads((tmp_path / "s.zarr" / LOCK).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    if sys.platform.startswith("linux"):
        assert isinstance(record["proc_start"], int) and record["proc_start"] == process_start(os.getpid())
    lock.release()
    assert not (tmp_path / "s.zarr" / LOCK).exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_process_start_reads_field_22_even_with_odd_command_names(tmp_path):
    # a command name with spaces and parentheses must not shift the fields
    odd = tmp_path / "a b) (c"
    odd.symlink_to(sys.executable)
    proc = live_process(odd)
    try:
        start = process_start(proc.pid)
        assert isinstance(start, int) and start >= process_start(os.getpid())
    finally:
        proc.kill()
        proc.communicate()
    assert process_start(proc.pid) is None  # gone


def test_a_live_holder_is_respected_and_named(tmp_path, sleeper):
    store = tmp_path / "s.zarr"
    write_lock(store, sleeper.pid)
    with pytest.raises(PkdCacheError, match=rf"being written by another dump \(pid {sleeper.pid} on "
                                            rf"{socket.gethostname()}, since 2024-01-02T03:04:05"):
        WriterLock(Location(str(store))).acquire()
    assert json.loads((store / LOCK).read_text())["pid"] == sleeper.pid  # untouched


def test_a_reused_pid_is_stale(tmp_path, sleeper):
    """The recorded pid is alive but started at another time: another process got the pid; the lock is taken."""
    store = tmp_path / "s.zarr"
    write_lock(store, sleeper.pid, proc_start=process_start(sleeper.pid) - 1)
    lock = WriterLock(Location(str(store)))
    lock.acquire()
    assert json.loads((store / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_holder_not_yet_reaped_is_stale(tmp_path):
    """A dump killed with SIGKILL is a zombie until its parent reaps it: its pid still answers kill(pid, 0) and its
    start time still matches, but it will never write again."""
    import signal

    proc = live_process()
    store = tmp_path / "s.zarr"
    write_lock(store, proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # not waited for: a zombie child of this test
    wait_until(lambda: journal.process_state(proc.pid) in ("Z", None), "the killed holder a zombie", timeout=60)
    try:
        lock = WriterLock(Location(str(store)))
        lock.acquire()
        assert json.loads((store / LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        proc.communicate()


def test_without_start_times_a_live_pid_is_respected(tmp_path, sleeper, monkeypatch):
    store = tmp_path / "s.zarr"
    write_lock(store, sleeper.pid, proc_start=None)  # a lock written before start times were recorded
    with pytest.raises(PkdCacheError, match=f"pid {sleeper.pid}"):
        WriterLock(Location(str(store))).acquire()
    write_lock(store, sleeper.pid, proc_start=12345)  # no /proc here: the pid check alone
    monkeypatch.setattr(journal, "process_start", lambda pid: None)
    with pytest.raises(PkdCacheError, match=f"pid {sleeper.pid}"):
        WriterLock(Location(str(store))).acquire()


def test_a_dead_or_unreadable_holder_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for content in (None, "{not json", "[1, 2]"):
        store = tmp_path / f"s{len(str(content))}.zarr"
        if content is None:
            write_lock(store, dead.pid, proc_start=123)
        else:
            (store / ".pkd_cache").mkdir(parents=True)
            (store / LOCK).write_text(content)
        lock = WriterLock(Location(str(store)))
        lock.acquire()
        assert json.loads((store / LOCK).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in (store / ".pkd_cache").iterdir()) == ["lock.json"]  # nothing set aside left
        lock.release()


def test_taking_over_never_removes_a_lock_that_replaced_the_dead_one(tmp_path, sleeper):
    """Between judging the holder dead and moving its lock, another dump may have taken it: that one stays."""
    store = tmp_path / "s.zarr"
    dead = {"host": socket.gethostname(), "pid": -1}
    live = write_lock(store, sleeper.pid)
    lock = WriterLock(Location(str(store)))
    with pytest.raises(PkdCacheError, match=f"pid {sleeper.pid}"):
        lock._take_over(store / LOCK, dead)
    assert json.loads((store / LOCK).read_text()) == live
    assert sorted(p.name for p in (store / ".pkd_cache").iterdir()) == ["lock.json"]


@pytest.mark.parametrize("state", ["lock only", "unfinished store"])
@pytest.mark.parametrize("flags", [(), ("--overwrite",), ("--resume",)])
def test_the_loser_of_two_dumps_into_one_out_names_the_winner(tmp_path, teacher_dir, data_dir, sleeper, state,
                                                              flags):
    """What the loser sees of the winner: its lock alone (just started) or an unfinished store. Whatever the
    flags, the loser says who is writing there, and leaves it alone."""
    out = tmp_path / "race.zarr"
    if state == "unfinished store":
        (out).mkdir()
        (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
            "format": "pkd-cache", "complete": False}}))
    write_lock(out, sleeper.pid, started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    before = tree_digest(out)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, *flags))
    assert p.returncode == 2, show(p)
    assert f"is being written by another dump (pid {sleeper.pid} on {socket.gethostname()}, since" in p.stderr, show(p)
    assert len(p.stderr.strip().splitlines()) == 1, show(p)
    assert tree_digest(out) == before


def test_a_dead_dumps_lock_alone_is_replaced_with_overwrite(tmp_path, teacher_dir, data_dir):
    """A dump killed right after taking the lock leaves a folder holding only its journal: ours to replace."""
    out = tmp_path / "dead.zarr"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(out, dead.pid, proc_start=1)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out))
    assert p.returncode == 2 and "already exists; pass --overwrite" in p.stderr, show(p)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, "--overwrite"))
    assert p.returncode == 0, show(p)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is True


def test_of_two_dumps_starting_at_once_the_loser_names_the_winner(tmp_path, sleeper, monkeypatch):
    """The winner's lock appears between the loser's look and its exclusive create: the create fails, and the
    lock it then reads is whole (linked into place, never seen empty)."""
    store = tmp_path / "s.zarr"
    write_lock(store, sleeper.pid)
    monkeypatch.setattr(WriterLock, "check", lambda self: None)  # looked before the winner's lock was there
    with pytest.raises(PkdCacheError, match=rf"another dump \(pid {sleeper.pid} on "):
        WriterLock(Location(str(store))).acquire()
    assert json.loads((store / LOCK).read_text())["pid"] == sleeper.pid
    assert sorted(p.name for p in (store / ".pkd_cache").iterdir()) == ["lock.json"]
