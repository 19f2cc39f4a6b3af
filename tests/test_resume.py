"""A dump survives SIGKILL, SIGTERM and a full disk: `--resume` finishes it, byte for byte as if never stopped."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pkd_cache
from pkd_cache.testing import cli_env, cli_in_process, show, wait_until, write_sst2
from pkd_cache.store.location import Location

pytestmark = pytest.mark.slow  # kills and resumes real processes: minutes in all

CHUNK = "64"


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    return write_sst2(tmp_path_factory.mktemp("big") / "SST-2", n_train=3000, n_dev=200)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """For the tests that kill a dump from outside: 188 chunks of train, about 4 s of teacher on one slow core.

    Every kill lands as the journal records the 30th chunk at the latest, so the dump still has seconds of work
    left when the signal arrives, even on a machine several times faster (3,000 examples left 0.3 s, and a fast CI
    run finished first).
    """
    return write_sst2(tmp_path_factory.mktemp("long") / "SST-2", n_train=12000, n_dev=200)


def dump_args(teacher, data, out, *extra):
    return ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out),
            "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", CHUNK, "--sort-window", "256", *extra]
    # windows of 4 chunks: kills land inside a window whose chunks are partly durable


def dump_reference(folder: Path, teacher: Path, data: Path) -> Path:
    out = folder / "ref.zarr"
    p = cli_in_process(*dump_args(teacher, data, out))
    assert p.returncode == 0, show(p)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, big_data):
    return dump_reference(tmp_path_factory.mktemp("ref"), teacher_dir, big_data)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, teacher_dir, long_data):
    return dump_reference(tmp_path_factory.mktemp("long_ref"), teacher_dir, long_data)


def files(store: Path) -> dict[str, bytes]:
    """Every file of the store but the root metadata (times and the record of resumptions may differ there)."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*"))
            if f.is_file() and f.relative_to(store) != Path("zarr.json")}


def assert_identical(store: Path, reference: Path) -> None:
    a, b = files(store), files(reference)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    meta = json.loads((store / "zarr.json").read_text())["attributes"]
    ref = json.loads((reference / "zarr.json").read_text())["attributes"]
    assert meta["complete"] and meta["cache_key"] == ref["cache_key"]


def start_dump(teacher, data, out):
    return subprocess.Popen([sys.executable, "-m", "pkd_cache", *dump_args(teacher, data, out)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_records(out: Path) -> int:
    """How many chunks of train the dump's journal says are durable."""
    progress = out / ".pkd_cache" / "progress" / "train"
    return len(list(progress.iterdir())) if progress.is_dir() else 0


def wait_for_progress(out: Path, proc, records: int = 1) -> None:
    wait_until(lambda: journal_records(out) >= records, f"{records} chunk(s) of train durable", proc=proc)


def kill(proc, sig=signal.SIGKILL) -> None:
    assert proc.poll() is None, "the dump finished before the signal: give it more data"
    proc.send_signal(sig)


@pytest.mark.kill
def test_sigkill_at_random_moments_then_resume_is_byte_identical(tmp_path, teacher_dir, long_data, long_reference):
    rng = random.Random(0)
    for i in range(2):  # two kills at random moments (each cycle costs CI about 17 s; a third put CI over 20 min)
        out = tmp_path / f"killed{i}.zarr"
        proc = start_dump(teacher_dir, long_data, out)
        wait_for_progress(out, proc, records=rng.randint(1, 30))  # then at once: the writer may be mid-chunk
        kill(proc)
        proc.wait(timeout=30)
        assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
        (out / "train" / "cls" / "c" / f".{i}.deadbeef.tmp").write_bytes(b"half a chunk")  # as a kill mid-write leaves
        (out / "train" / f"zarr.{i}deadbeef.partial").write_bytes(b"{half")  # zarr's own half-written metadata
        p = cli_in_process(*dump_args(teacher_dir, long_data, out, "--resume"))
        assert p.returncode == 0, show(p)
        assert "resumed" in p.stderr and "the teacher ran on" in p.stderr, show(p)
        assert_identical(out, long_reference)
        assert not (out / ".pkd_cache").exists()


@pytest.mark.kill
def test_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, teacher_dir, long_data, long_reference):
    out = tmp_path / "term.zarr"
    proc = start_dump(teacher_dir, long_data, out)
    wait_for_progress(out, proc, records=3)
    kill(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "examples are durable" in err and "--resume" in err and "Traceback" not in err, err
    assert not (out / ".pkd_cache" / "lock.json").exists()  # released on the way out
    p = cli_in_process(*dump_args(teacher_dir, long_data, out))  # a plain re-run does not resume: it says how
    assert p.returncode == 2 and "--resume" in p.stderr, show(p)
    p = cli_in_process(*dump_args(teacher_dir, long_data, out, "--resume"))
    assert p.returncode == 0, show(p)
    assert_identical(out, long_reference)


def test_one_writer_at_a_time_and_stale_locks(tmp_path, teacher_dir, long_data, long_reference):
    out = tmp_path / "locked.zarr"
    proc = start_dump(teacher_dir, long_data, out)
    wait_for_progress(out, proc)
    p = cli_in_process(*dump_args(teacher_dir, long_data, out, "--resume"))
    holder = json.loads((out / ".pkd_cache" / "lock.json").read_text())
    assert p.returncode == 2 and f"pid {proc.pid}" in p.stderr and holder["pid"] == proc.pid, show(p)
    kill(proc)
    proc.wait(timeout=30)
    assert (out / ".pkd_cache" / "lock.json").exists()  # left behind by the killed process: stale
    p = cli_in_process(*dump_args(teacher_dir, long_data, out, "--resume"))
    assert p.returncode == 0, show(p)
    assert_identical(out, long_reference)


def test_a_full_disk_is_one_line_and_leaves_the_store_resumable(tmp_path, teacher_dir, big_data, reference,
                                                                monkeypatch):
    out = tmp_path / "full.zarr"
    real_write, count = Location.write, {"n": 0}

    def failing_write(self, key, data):
        count["n"] += 1
        if count["n"] > 200:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.local / key))
        return real_write(self, key, data)

    monkeypatch.setattr(Location, "write", failing_write)
    p = cli_in_process(*dump_args(teacher_dir, big_data, out))
    assert p.returncode == 2 and "No space left on device" in p.stderr and len(p.stderr.splitlines()) == 1, show(p)
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
    monkeypatch.setattr(Location, "write", real_write)
    p = cli_in_process(*dump_args(teacher_dir, big_data, out, "--resume"))
    assert p.returncode == 0, show(p)
    assert_identical(out, reference)


def test_resume_with_other_settings_refuses(tmp_path, teacher_dir, long_data):
    out = tmp_path / "other.zarr"
    proc = start_dump(teacher_dir, long_data, out)
    wait_for_progress(out, proc, records=2)
    kill(proc)
    proc.wait(timeout=30)
    p = cli_in_process(*dump_args(teacher_dir, long_data, out, "--resume", "--dtype", "int8"))
    assert p.returncode == 2 and "cannot resume" in p.stderr and "dtype 'float16' -> 'int8'" in p.stderr, show(p)
    assert pkd_cache.open_store(str(out), require_complete=False).complete is False


def _student_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix == ".safetensors"}


def kill_distill_mid_epoch_2(args: list, out: Path) -> None:
    """Run `pkd-cache <args> --output-dir out` in a subprocess and SIGKILL it once a checkpoint mid-epoch 2 exists."""
    proc = subprocess.Popen([sys.executable, "-m", "pkd_cache", *args, "--output-dir", str(out)], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: checkpoint_position(out)[0] == 1 and checkpoint_position(out)[1] > 0, "a checkpoint mid-epoch 2",
               proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "metrics.json").exists()


def checkpoint_position(out: Path) -> tuple[int, int]:
    """(epoch, batch) of the distill's last checkpoint; (0, 0) before one is complete."""
    state = out / "checkpoint" / "state.json"
    try:
        pos = json.loads(state.read_text())["position"]
    except (OSError, ValueError, KeyError):  # none yet, or being replaced
        return 0, 0
    return pos["epoch"], pos["batch"]


@pytest.mark.kill
def test_a_killed_distill_resumes_to_the_same_student_bit_for_bit(tmp_path, reference, backbone_dir):
    base = ["distill", "--store", str(reference), "--student-init", str(backbone_dir), "--student-layers", "2",
            "--epochs", "3", "--batch-size", "32", "--learning-rate", "1e-3", "--seed", "5", "--logging-steps", "0"]
    # every run in a subprocess with one thread: bit-identity needs the same float reduction order throughout
    p = subprocess.run([sys.executable, "-m", "pkd_cache", *base, "--output-dir", str(tmp_path / "whole")],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, show(p)
    assert not (tmp_path / "whole" / "checkpoint").exists()  # removed once finished

    out = tmp_path / "killed"
    kill_distill_mid_epoch_2([*base, "--save-steps", "7"], out)
    p = subprocess.run([sys.executable, "-m", "pkd_cache", *base, "--output-dir", str(out), "--resume"], env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "resuming at step" in p.stderr, show(p)
    assert _student_files(out) == _student_files(tmp_path / "whole")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
    p = cli_in_process(*base, "--output-dir", out, "--resume")  # finished: nothing to resume
    assert p.returncode == 2 and "no checkpoint" in p.stderr, show(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_in_a_subprocess(tmp_path, teacher_dir, big_data, reference):
    """A 256 KiB tmpfs fills up mid-dump: one line, exit 2, the store unfinished; resumed elsewhere it completes."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        out = mount / "full.zarr"
        p = subprocess.run([sys.executable, "-m", "pkd_cache", *dump_args(teacher_dir, big_data, out)], env=cli_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, show(p)
        assert p.stderr.strip().splitlines()[-1].startswith("error: No space left on device"), show(p)
        assert "Traceback" not in p.stderr
        assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
        moved = tmp_path / "moved.zarr"
        subprocess.run(["cp", "-a", str(out), str(moved)], check=True)  # room found elsewhere: carry on there
    finally:
        subprocess.run(["umount", str(mount)])
    p = cli_in_process(*dump_args(teacher_dir, big_data, moved, "--resume"))
    assert p.returncode == 0, show(p)
    assert_identical(moved, reference)


def test_many_readers_at_once_and_reading_never_writes(tmp_path, reference, backbone_dir):
    """4 processes (two per core) distil from one store at the same time; the store's files are untouched
    afterwards."""
    before = {str(f.relative_to(reference)): (f.stat().st_mtime_ns, f.read_bytes()) for f in reference.rglob("*")
              if f.is_file()}
    procs = [subprocess.Popen([sys.executable, "-m", "pkd_cache", "distill", "--store", str(reference),
                               "--student-init", str(backbone_dir), "--student-layers", "2", "--max-steps", "3",
                               "--batch-size", "16", "--output-dir", str(tmp_path / f"s{i}")], env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert all((tmp_path / f"s{i}" / "model.safetensors").is_file() for i in range(4))
    after = {str(f.relative_to(reference)): (f.stat().st_mtime_ns, f.read_bytes()) for f in reference.rglob("*")
             if f.is_file()}
    assert after == before
