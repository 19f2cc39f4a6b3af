"""`dump --format arrow`: the same content and metadata as Arrow IPC shards, read transparently by every command
and loadable with `datasets.load_dataset("arrow", ...)`."""
import json
import re
import shutil

import numpy as np
import pytest
from pkd_cache.testing import cli_in_process, show

import pkd_cache
from pkd_cache.store.verify import verify_store


def dump(teacher_dir, data_dir, out, **kw):
    return pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                               out=str(out), max_seq_length=24, batch_size=16, chunk_size=64, **kw))


@pytest.fixture(scope="module")
def arrow_path(tmp_path_factory, teacher_dir, data_dir):
    out = tmp_path_factory.mktemp("arrow") / "sst2.arrow"
    dump(teacher_dir, data_dir, out, format="arrow")
    return out


def all_batches(store, **kw):
    return [{k: v.numpy() for k, v in b.items()} for b in store.batches("train", 24, seed=4, shuffle_chunks=2, **kw)]


@pytest.mark.parametrize("layers", [None, [0, 3]])
def test_arrow_store_reads_exactly_like_the_zarr_one(arrow_path, store_path, layers):
    a, z = pkd_cache.open_store(str(arrow_path)), pkd_cache.open_store(str(store_path))
    assert a.store_format == "arrow" and z.store_format == "zarr"
    skip = {"store_format", "created_at", "completed_at", "cache_key", "cache_key_parts", "settings", "checksums",
            "dump_seconds"}
    assert {k: v for k, v in a.info().items() if k not in skip} == {k: v for k, v in z.info().items() if k not in skip}
    for x, y in zip(all_batches(a, layers=layers), all_batches(z, layers=layers), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    np.testing.assert_array_equal(a.array("validation", "cls")[5:50], z.array("validation", "cls")[5:50])


def test_arrow_shards_load_with_datasets(arrow_path, store_path):
    import datasets

    ds = datasets.load_dataset("arrow", data_files={"train": str(arrow_path / "train" / "*.arrow")}, split="train")
    z = pkd_cache.open_store(str(store_path))
    assert ds.num_rows == 160 and "cls_4" in ds.column_names
    np.testing.assert_array_equal(np.asarray(ds["labels"]), z.array("train", "labels")[:])
    np.testing.assert_array_equal(np.asarray(ds.with_format("numpy")["cls_2"]), z.array("train", "cls")[:, 2])


def test_verify_info_ls_and_distill_take_arrow(arrow_path, store_path, backbone_dir, tmp_path):
    assert verify_store(str(arrow_path)).ok
    p = cli_in_process("info", arrow_path)
    assert p.returncode == 0 and "sst2" in p.stdout, show(p)
    folder = tmp_path / "stores"
    folder.mkdir()
    shutil.copytree(arrow_path, folder / "a.arrow")
    shutil.copytree(store_path, folder / "z.zarr")
    p = cli_in_process("ls", folder)
    assert p.returncode == 0 and "a.arrow" in p.stdout and "z.zarr" in p.stdout, show(p)  # names never cut
    p = cli_in_process("ls", folder, "--json")
    assert [s["name"] for s in json.loads(p.stdout)] == ["a.arrow", "z.zarr"], show(p)
    p = cli_in_process("distill", "--store", arrow_path, "--student-layers", "2", "--student-init", backbone_dir,
                       "--output-dir", tmp_path / "student", "--max-steps", "2", "--batch-size", "16")
    assert p.returncode == 0, show(p)


def test_a_corrupt_shard_is_named(arrow_path, tmp_path):
    copy = tmp_path / "copy.arrow"
    shutil.copytree(arrow_path, copy)
    shard = copy / "train" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x04
    shard.write_bytes(bytes(data))
    assert any(p.startswith("train/cls chunk train/00001.arrow:cls_") and "is corrupt" in p
               for p in verify_store(str(copy)).problems)
    with pytest.raises(pkd_cache.PkdCacheError, match="chunk train/00001.arrow is corrupt"):
        all_batches(pkd_cache.open_store(str(copy)))


def test_int8_arrow_matches_int8_zarr(teacher_dir, data_dir, tmp_path):
    a = dump(teacher_dir, data_dir, tmp_path / "i8.arrow", dtype="int8", format="arrow")
    z = dump(teacher_dir, data_dir, tmp_path / "i8.zarr", dtype="int8")
    for x, y in zip(all_batches(a, layers=[2]), all_batches(z, layers=[2]), strict=True):
        np.testing.assert_array_equal(x["cls"], y["cls"])


def test_an_arrow_store_over_http(arrow_path, tmp_path):
    import threading

    from pkd_cache.commands.serve import make_server

    shutil.copytree(arrow_path, tmp_path / "sst2.arrow")
    server = make_server(str(tmp_path), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = pkd_cache.open_store(f"{server.url}/sst2.arrow")
        for x, y in zip(all_batches(remote, layers=[1]), all_batches(pkd_cache.open_store(str(arrow_path)), layers=[1]),
                        strict=True):
            np.testing.assert_array_equal(x["cls"], y["cls"])
        assert [s["name"] for s in json.loads(cli_in_process("ls", server.url, "--json").stdout)] == ["sst2.arrow"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["splits"]["train"].update(num_examples=100), "1 recorded chunk(s) belong to no array"),
    (lambda m: m["splits"]["train"].update(num_examples=170), "column input_ids holds 32 rows"),
    (lambda m: m["splits"]["train"].update(num_examples=10 ** 12), "the layout needs 15,625,000,001 chunks"),
    (lambda m: m["teacher"].update(num_layers=6), "has no column cls_5"),
    (lambda m: m.update(cls_dtype="float32"), "of fixed_size_list<item: float>[32]"),
])
def test_an_arrow_store_whose_metadata_disagrees_with_its_shards_is_refused(arrow_path, tmp_path, edit, says):
    """The Arrow flavour has no per-array metadata: the shards' row counts and column types are checked against
    the metadata as they are read, and the manifest bounds the shard count before anything is listed."""
    copy = tmp_path / "copy.arrow"
    shutil.copytree(arrow_path, copy)
    meta = json.loads((copy / "pkd_cache.json").read_text())
    edit(meta)
    (copy / "pkd_cache.json").write_text(json.dumps(meta))
    with pytest.raises(pkd_cache.PkdCacheError, match=re.escape(says)):
        store = pkd_cache.open_store(str(copy))
        list(store.batches("train", 16, seed=1))
    assert not verify_store(str(copy)).ok


def test_an_arrow_store_without_its_manifest_is_refused_unless_allowed(arrow_path, tmp_path):
    copy = tmp_path / "copy.arrow"
    shutil.copytree(arrow_path, copy)
    meta = json.loads((copy / "pkd_cache.json").read_text())
    meta.pop("checksums")
    (copy / "pkd_cache.json").write_text(json.dumps(meta))
    (copy / "checksums.json").unlink()
    with pytest.raises(pkd_cache.PkdCacheError, match="has no checksum manifest"):
        pkd_cache.open_store(str(copy))
    a = all_batches(pkd_cache.open_store(str(arrow_path)))
    b = all_batches(pkd_cache.open_store(str(copy), allow_no_checksums=True))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
