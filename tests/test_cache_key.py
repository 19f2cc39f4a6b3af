"""Identity and cache hits: a dump that would write the same store is skipped; a different one is refused."""
import csv
import shutil

import pytest

import pkd_cache
from pkd_cache.errors import PkdCacheError
from pkd_cache.testing import cli_in_process, make_bert, show, tree_digest

ARGS = dict(task="sst2", max_seq_length=24, batch_size=16, chunk_size=64)


def dump(teacher, data, out, **kw):
    return pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher), data_dir=str(data), out=str(out), **{**ARGS, **kw}))


def test_the_same_dump_twice_is_a_cache_hit(store_path, teacher_dir, data_dir, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    before = tree_digest(copy)
    p = cli_in_process("dump", "--teacher", teacher_dir, "--task", "sst2", "--data-dir", data_dir, "--out", copy,
                       "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64")
    assert p.returncode == 0 and "cache hit" in p.stderr + p.stdout, show(p)
    assert tree_digest(copy) == before  # not rewritten
    meta = pkd_cache.open_store(str(copy)).info()
    assert len(meta["cache_key"]) == 64 and set(meta["cache_key_parts"]) == {"teacher", "tokenizer", "data", "settings"}


def test_the_key_follows_content_not_file_names_or_formats(store_path, teacher_dir, data_dir, tmp_path):
    """The same examples as CSV files in another folder: the same data fingerprint, so still a hit."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name in ("train", "dev"):
        rows = list(csv.reader(open(data_dir / f"{name}.tsv"), delimiter="\t"))
        with open(other / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    s = dump(teacher_dir, other, copy)
    assert s.info()["cache_key"] == pkd_cache.open_store(str(store_path)).info()["cache_key"]


@pytest.mark.parametrize("change, says", [
    ("data", "data (train)"),
    ("teacher", "teacher weights"),
    ("settings", "dtype 'float16' -> 'int8'"),
])
def test_a_different_dump_is_refused_and_names_the_difference(store_path, teacher_dir, data_dir, tmp_path,
                                                               change, says):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    kw, teacher = {}, teacher_dir
    if change == "data":
        kw["max_examples"] = 100
    elif change == "teacher":
        teacher = make_bert(tmp_path / "other-teacher", layers=4, head=True, seed=7)
    else:
        kw["dtype"] = "int8"
    before = tree_digest(copy)
    with pytest.raises(PkdCacheError, match="holds a different dump") as e:
        dump(teacher, data_dir, copy, **kw)
    assert says in str(e.value)
    assert tree_digest(copy) == before
    s = dump(teacher, data_dir, copy, overwrite=True, **kw)  # --overwrite replaces it
    assert s.info()["cache_key"] != pkd_cache.open_store(str(store_path)).info()["cache_key"]
