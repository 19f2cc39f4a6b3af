"""Dump settings that could only fail once the work has started are refused before anything is written, and a
dump that fails before its first durable chunk leaves no store of its own behind (and a store it found alone)."""
import errno
import importlib
import json
import os

import numpy as np
import pytest

from pkd_cache.data.loading import Examples
from pkd_cache.data.tokenize import check_seq_length, min_seq_length, tokenize
from pkd_cache.errors import PkdCacheError
from pkd_cache.store.location import Location
from pkd_cache.testing import cli_in_process, make_tokenizer, show, tree_digest

dump_module = importlib.import_module("pkd_cache.commands.dump_run")  # the teacher's run and the writes


def dump_args(teacher, data, out, *extra, seq="24"):
    return ["dump", "--teacher", str(teacher), "--task", "sst2", "--data-dir", str(data), "--out", str(out),
            "--max-seq-length", seq, "--batch-size", "16", "--chunk-size", "16", "--max-examples", "64", *extra]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def examples(pair: bool) -> Examples:
    a = ["the film was very good and the acting superb", "bad"]
    return Examples(a, ["a dull plot", "the music was lovely and the story fine"] if pair else None,
                    np.array([1, 0]), "test")


@pytest.mark.parametrize("pair, need", [(False, 3), (True, 5)])
def test_the_shortest_max_seq_length_keeps_a_token_of_each_text(tokenizer, pair, need):
    assert min_seq_length(tokenizer, pair) == need  # BERT: [CLS] a [SEP] (b [SEP])
    ex = examples(pair)
    arrays = tokenize(tokenizer, ex, 0, 2, need)
    assert arrays["input_ids"].shape == (2, need)
    assert (arrays["attention_mask"] == 1).all()
    specials = set(tokenizer.all_special_ids)
    for row, types in zip(arrays["input_ids"], arrays["token_type_ids"]):
        texts = {int(t) for i, t in zip(row, types) if int(i) not in specials}
        assert texts == ({0, 1} if pair else {0})  # no text vanished
    for short in range(0, need):
        with pytest.raises(PkdCacheError, match=f"^--max-seq-length {short} is too short: .* use "
                                                f"--max-seq-length {need} or more$"):
            check_seq_length(tokenizer, ex, short)
        with pytest.raises(PkdCacheError):  # tokenize itself never makes ragged or text-less rows
            tokenize(tokenizer, ex, 0, 2, short)


@pytest.mark.parametrize("seq", ["1", "2"])
def test_dump_refuses_a_too_short_max_seq_length_before_writing(tmp_path, teacher_dir, data_dir, seq):
    out = tmp_path / "short.zarr"
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, seq=seq))
    assert p.returncode == 2, show(p)
    assert p.stderr.strip() == (f"error: --max-seq-length {seq} is too short: the tokenizer adds 2 special tokens "
                                f"to each sentence, and the text needs at least one more; use --max-seq-length 3 "
                                f"or more"), show(p)
    assert not out.exists()


def test_a_store_already_there_is_left_as_it_was(tmp_path, teacher_dir, data_dir):
    out = tmp_path / "kept.zarr"
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out))
    assert p.returncode == 0, show(p)
    before = tree_digest(out)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, "--overwrite", seq="1"))
    assert p.returncode == 2 and "--max-seq-length 1 is too short" in p.stderr, show(p)
    assert tree_digest(out) == before


def full_disk_after(monkeypatch, writes: int) -> None:
    """Location.write (chunks and their progress records) fails with ENOSPC after `writes` writes."""
    real, count = Location.write, {"n": 0}

    def write(self, key, data):
        count["n"] += 1
        if count["n"] > writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.local / key))
        return real(self, key, data)

    monkeypatch.setattr(Location, "write", write)


@pytest.mark.parametrize("error", [PkdCacheError("the teacher failed"), ValueError("a bug set off by the input")])
def test_a_failure_in_the_work_before_any_chunk_leaves_no_store(tmp_path, teacher_dir, data_dir, monkeypatch,
                                                                 error):
    """Bad input found once the work started (or a bug it set off): a dump with nothing durable removes what it
    made."""
    out = tmp_path / "none.zarr"
    calls = {"n": 0}
    real = dump_module.run_chunk

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:  # the first call is dump's check on a couple of examples, before --out is made
            raise error
        return real(*a, **k)

    monkeypatch.setattr(dump_module, "run_chunk", failing)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, "--split", "train"))
    assert p.returncode != 0 and str(error) in p.stderr, show(p)
    assert calls["n"] == 2 and not out.exists()


def test_a_full_disk_before_the_first_chunk_leaves_the_store_resumable(tmp_path, teacher_dir, data_dir,
                                                                      monkeypatch):
    """The environment failing (not the input) is what --resume is for: the store stays, unfinished."""
    out = tmp_path / "full.zarr"
    full_disk_after(monkeypatch, 0)
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out))
    assert p.returncode == 2 and "No space left on device" in p.stderr, show(p)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is False
    assert not (out / ".pkd_cache" / "lock.json").exists()


def test_a_failure_after_a_durable_chunk_keeps_the_store_resumable(tmp_path, teacher_dir, data_dir, monkeypatch):
    out = tmp_path / "some.zarr"
    full_disk_after(monkeypatch, 13)  # the first chunk's 12 files (cls: one per layer) and its record
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out))
    assert p.returncode == 2 and "No space left on device" in p.stderr, show(p)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is False
    assert [p.name for p in (out / ".pkd_cache" / "progress" / "train").iterdir()] == ["000000.json"]
    monkeypatch.undo()
    p = cli_in_process(*dump_args(teacher_dir, data_dir, out, "--resume"))
    assert p.returncode == 0, show(p)
