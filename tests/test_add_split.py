"""`dump --add-split NAME` (commands/dump_extend.py): a complete store grows a split; what it held is not rewritten,
the result equals a fresh dump of every split, and a stopped extension leaves the store as it was."""
import json
from pathlib import Path

import numpy as np
import pytest
from pkd_cache.testing import cli_in_process, show

import pkd_cache
from pkd_cache.store.cache import entries

ARGS = ["--task", "sst2", "--max-seq-length", "24", "--batch-size", "16", "--chunk-size", "64"]
FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "logits", "cls", "example_hash")


def dump(teacher, data, *extra):
    return cli_in_process("dump", "--teacher", teacher, "--data-dir", data, *ARGS, *extra)


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store but its metadata and manifest (which an extension rewrites), by relative path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*")
            if p.is_file() and p.name not in ("zarr.json", "pkd_cache.json", "checksums.json")
            or (p.name == "zarr.json" and p.parent != store)}


def assert_same_split(a, b, split: str) -> None:
    """The arrays of `split` in two stores are equal: the teacher ran on the same windows and batches."""
    n = b.num_examples(split)
    assert a.num_examples(split) == n
    x, y = a.read(split, 0, n), b.read(split, 0, n)
    assert set(x) == set(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{split}/{k}")


@pytest.mark.parametrize("fmt", ["zarr", "arrow"])
def test_a_split_is_added_without_rewriting_the_store(teacher_dir, data_dir, tmp_path, fmt):
    out = tmp_path / f"s.{fmt}"
    p = dump(teacher_dir, data_dir, "--out", out, "--split", "train", "--format", fmt)
    assert p.returncode == 0, show(p)
    before = files(out)
    p = dump(teacher_dir, data_dir, "--out", out, "--add-split", "validation", "--format", fmt)
    assert p.returncode == 0, show(p)
    assert "added validation (48 examples)" in " ".join(p.stderr.split()), show(p)
    after = files(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing it held was rewritten
    assert all(k.startswith("validation/") for k in set(after) - set(before))

    grown = pkd_cache.open_store(str(out))
    assert grown.splits == ["train", "validation"]
    assert [a["splits"] for a in grown.info()["added_splits"]] == [["validation"]]
    fresh = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                                out=str(tmp_path / f"fresh.{fmt}"), max_seq_length=24,
                                                batch_size=16, chunk_size=64, format=fmt))
    for split in ("train", "validation"):
        assert_same_split(grown, fresh, split)
    assert grown.info()["cache_key_parts"] == fresh.info()["cache_key_parts"]
    p = cli_in_process("verify", out)
    assert p.returncode == 0, show(p)
    # the dump of both splits into that --out is now a hit; the first dump (train alone) still is
    for extra in ([], ["--split", "train"]):
        p = dump(teacher_dir, data_dir, "--out", out, "--format", fmt, *extra)
        assert p.returncode == 0 and "cache hit:" in p.stderr, show(p)


def test_a_stopped_extension_leaves_the_store_as_it_was(teacher_dir, data_dir, tmp_path, monkeypatch):
    """Stopped between the grown manifest and the metadata that lists the split (the last moment it can stop):
    the store still opens, verifies and reads as before; the same command then adds the split."""
    from pkd_cache.store import sink

    out = tmp_path / "s.zarr"
    assert dump(teacher_dir, data_dir, "--out", out, "--split", "train").returncode == 0
    first = pkd_cache.open_store(str(out)).read("train", 0, 160)

    def stop(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sink.ChunkedWriter, "_write_complete", stop, raising=False)
        m.setattr("pkd_cache.store.backends.zarr_backend.StoreWriter._write_complete", stop)
        p = dump(teacher_dir, data_dir, "--out", out, "--add-split", "validation")
    assert p.returncode != 0 and len(json.loads((out / "checksums.json").read_text())["chunks"]) > 0
    assert any(k.startswith("validation/") for k in json.loads((out / "checksums.json").read_text())["chunks"])
    p = cli_in_process("verify", out)
    assert p.returncode == 0, show(p)
    store = pkd_cache.open_store(str(out))
    assert store.splits == ["train"]
    for k, v in store.read("train", 0, 160).items():
        np.testing.assert_array_equal(v, first[k])
    p = dump(teacher_dir, data_dir, "--out", out, "--add-split", "validation")
    assert p.returncode == 0, show(p)
    assert pkd_cache.open_store(str(out)).splits == ["train", "validation"]
    assert cli_in_process("verify", out).returncode == 0


def test_a_split_is_added_to_a_cache_entry(teacher_dir, data_dir, tmp_path):
    """Without --out: the entry of the same dump without the new split grows; it keeps its id, so the first dump
    stays a hit."""
    cache = tmp_path / "cache"
    cache.mkdir()
    p = dump(teacher_dir, data_dir, "--cache", cache, "--split", "train")
    assert p.returncode == 0, show(p)
    (name, ident), = entries(str(cache))
    p = dump(teacher_dir, data_dir, "--cache", cache, "--split", "train", "--add-split", "validation")
    assert p.returncode == 0, show(p)
    assert entries(str(cache)) == [(name, ident)]
    assert pkd_cache.open_store(str(cache / name)).splits == ["train", "validation"]
    p = dump(teacher_dir, data_dir, "--cache", cache, "--split", "train")
    assert p.returncode == 0 and f"(id {ident})" in p.stderr and "cache hit:" in p.stderr, show(p)


@pytest.mark.parametrize("extra, says", [
    (["--add-split", "train"], "already holds split 'train'"),
    (["--add-split", "test_matched"], "task sst2 has no split 'test_matched'; its splits are train, validation"),
    (["--add-split", "validation", "--max-seq-length", "32"],
     "was dumped with --max-seq-length 24, not 32: a split is added with the store's settings (leave "
     "--max-seq-length out)"),
    (["--add-split", "validation", "--overwrite"], "--add-split extends a complete store; it cannot be combined"),
])
def test_bad_add_split_input_is_one_line(teacher_dir, data_dir, tmp_path_factory, extra, says):
    out = tmp_path_factory.getbasetemp() / "add_split_bad.zarr"
    if not out.exists():
        assert dump(teacher_dir, data_dir, "--out", out, "--split", "train").returncode == 0
    before = files(out)
    p = dump(teacher_dir, data_dir, "--out", out, *extra)
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)
    assert files(out) == before and pkd_cache.open_store(str(out)).splits == ["train"]


def test_another_teacher_is_refused(teacher_dir, data_dir, tmp_path, backbone_dir):
    out = tmp_path / "s.zarr"
    assert dump(teacher_dir, data_dir, "--out", out, "--split", "train").returncode == 0
    p = dump(backbone_dir, data_dir, "--out", out, "--add-split", "validation")
    assert p.returncode == 2 and "was dumped from another teacher or with other settings (differs in: teacher " \
        "weights" in p.stderr, show(p)


@pytest.mark.parametrize("setting, value", [("sort_window", -5), ("precision", "fp7"), ("max_examples", 0.5)])
def test_a_store_recording_impossible_settings_is_refused(teacher_dir, data_dir, tmp_path, setting, value):
    """The settings --add-split takes from the store are checked as if given on the command line."""
    out = tmp_path / "s.zarr"
    assert dump(teacher_dir, data_dir, "--out", out, "--split", "train").returncode == 0
    doc = json.loads((out / "zarr.json").read_text())
    doc["attributes"]["settings"][setting] = value
    (out / "zarr.json").write_text(json.dumps(doc))
    p = dump(teacher_dir, data_dir, "--out", out, "--add-split", "validation")
    assert p.returncode == 2 and "records a setting no dump takes" in p.stderr, show(p)
    assert len(p.stderr.strip().splitlines()) == 1 and not (out / "validation").exists(), show(p)
