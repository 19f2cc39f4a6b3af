"""Dump under torchrun (gloo, 2 CPU ranks): the store equals a one-process dump byte for byte, and a dump killed
with one rank count is finished with another."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_sst2
from test_cli import ENV, show
from test_resume import files

from pkd_cache.distributed import balanced_shares
from pkd_cache.dump_shares import window_tokens

ARGS = ["--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64", "--sort-window", "128"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sst2(tmp_path_factory.mktemp("dist") / "SST-2", n_train=1200, n_dev=100)


def dump_cmd(teacher, data, out, ranks: int, *extra) -> list[str]:
    args = ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out), *ARGS,
            *extra]
    if ranks == 1:
        return [sys.executable, "-m", "pkd_cache", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "pkd_cache", *args]


def run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, data):
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    p = run(dump_cmd(teacher_dir, data, out, 1))
    assert p.returncode == 0, show(p)
    return out


def attributes(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]


def assert_same_store(store: Path, reference: Path) -> None:
    a, b = files(store), files(reference)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # every chunk and checksums.json, byte for byte
    meta, ref = attributes(store), attributes(reference)
    assert meta["complete"] and meta["cache_key"] == ref["cache_key"] and meta["splits"] == ref["splits"]


def test_two_ranks_write_the_same_store_as_one(tmp_path, teacher_dir, data, reference):
    out = tmp_path / "two.zarr"
    p = run(dump_cmd(teacher_dir, data, out, 2))
    assert p.returncode == 0, show(p)
    assert "2 ranks" in p.stderr and "(rank 1/2)" in p.stderr  # both ranks ran a share
    assert_same_store(out, reference)
    assert attributes(out)["dump_ranks"] == 2
    p = run(dump_cmd(teacher_dir, data, out, 2))
    assert p.returncode == 0 and "cache hit" in p.stderr, show(p)


def kill_after_progress(cmd, out: Path, records: int) -> None:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    progress = out / ".pkd_cache" / "progress" / "train"
    deadline = time.monotonic() + 300
    while not (progress.is_dir() and len(list(progress.iterdir())) >= records):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the dump never made progress"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher at once, as a lost node would
    proc.wait(timeout=60)
    assert not attributes(out)["complete"]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_killed_dump_is_finished_with_another_rank_count(tmp_path, teacher_dir, data, reference, first, then):
    out = tmp_path / "killed.zarr"
    kill_after_progress(dump_cmd(teacher_dir, data, out, first), out, records=5)
    p = run(dump_cmd(teacher_dir, data, out, then, "--resume"))
    assert p.returncode == 0 and "resumed" in p.stderr, show(p)
    assert_same_store(out, reference)


def test_shares_balance_tokens_not_examples():
    costs = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    shares = balanced_shares(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(11))  # disjoint, and all of them
    assert [sum(costs[i] for i in s) for s in shares] == [10.0, 10.0]
    assert balanced_shares([1.0, 1.0], 3) == [[0], [1], []]
    import numpy as np
    lengths = np.array([5, 3, 9, 1])
    assert window_tokens(lengths, 2, 16, bucketed=True) == 9 * 2 + 3 * 2  # sorted: [9, 5] [3, 1]
    assert window_tokens(lengths, 2, 16, bucketed=False) == 4 * 16
