"""Integrity: `pkd-cache verify` names what is wrong with a store; a corrupt chunk stops distill with a clear error."""
import json
import re
import shutil

import pytest
from pkd_cache.testing import cli_in_process, show

import pkd_cache
from pkd_cache.store.verify import verify_store


@pytest.fixture
def copy(store_path, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(store_path, out)
    return out


def cls_chunk(store, layer: int = 2):
    return store / "train" / "cls" / "c" / "1" / str(layer) / "0"


def test_a_sound_store_verifies(store_path):
    r = verify_store(str(store_path))
    assert r.ok and r.checksummed, r.problems
    manifest = json.loads((store_path / "checksums.json").read_text())
    # 3 chunks x (5 token/label/logit arrays + 5 CLS layers + example_hash + text_hash) for train (160 rows),
    # 1 x 12 for validation (48 rows)
    assert r.chunks == len(manifest["chunks"]) == 3 * 12 + 1 * 12
    p = cli_in_process("verify", store_path)
    assert p.returncode == 0 and p.stdout.startswith("ok: ") and "match their checksums" in p.stdout, show(p)


def test_a_flipped_byte_is_found_and_named(copy):
    chunk = cls_chunk(copy)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # still decodes: only the checksum can tell
    chunk.write_bytes(bytes(data))
    r = verify_store(str(copy))
    assert r.problems == ["train/cls chunk c/1/2/0 is corrupt (its checksum does not match the one recorded at "
                          "dump time)"]
    p = cli_in_process("verify", copy)
    assert p.returncode == 1, show(p)
    assert "problem: train/cls chunk c/1/2/0 is corrupt" in p.stdout and "1 problem(s)" in p.stderr


def test_missing_chunks_manifest_and_completeness_are_all_reported(copy):
    cls_chunk(copy, 0).unlink()
    (copy / "validation" / "logits" / "c" / "0" / "0").unlink()
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (copy / "zarr.json").write_text(json.dumps(meta))
    problems = verify_store(str(copy)).problems
    assert problems[0].startswith("store: not complete")
    assert "train/cls chunk c/1/0/0 is missing" in problems and "validation/logits chunk c/0/0 is missing" in problems
    (copy / "checksums.json").unlink()
    assert any("manifest checksums.json is missing" in p for p in verify_store(str(copy)).problems)


def test_bad_values_and_unrecorded_chunks(copy, tmp_path):
    import numpy as np
    from pkd_cache.testing.tamper import decode, rewrite_chunk

    store = pkd_cache.open_store(str(copy))
    labels = decode(copy / "train/labels/c/0", (64,), np.int64)
    labels[3] = 7  # a 2-label task
    rewrite_chunk(copy, "train/labels/c/0", labels)
    manifest = json.loads((copy / "checksums.json").read_text())
    manifest["chunks"]["train/labels/c/9"] = [1, 2]
    (copy / "checksums.json").write_text(json.dumps(manifest))
    problems = verify_store(str(copy)).problems
    assert "checksums: 1 recorded chunk(s) belong to no array, e.g. train/labels/c/9" in problems
    del manifest["chunks"]["train/labels/c/9"]
    (copy / "checksums.json").write_text(json.dumps(manifest))
    problems = verify_store(str(copy)).problems
    assert problems == ["train/labels chunk c/0 holds labels outside [0, 2) (e.g. 7)"]
    assert np.isfinite(store.array("train", "logits")[:]).all()


def test_not_a_store_is_a_one_line_error(tmp_path):
    p = cli_in_process("verify", tmp_path)
    assert p.returncode == 2 and "is not a pkd-cache store" in p.stderr and len(p.stderr.splitlines()) == 1, show(p)


def test_distill_stops_on_a_corrupt_chunk_and_names_it(copy, backbone_dir, tmp_path):
    for layer in range(5):
        chunk = cls_chunk(copy, layer)
        data = bytearray(chunk.read_bytes())
        data[-3] ^= 0xFF
        chunk.write_bytes(bytes(data))
    p = cli_in_process("distill", "--store", copy, "--student-layers", "2", "--student-init", backbone_dir,
                       "--output-dir", tmp_path / "student", "--epochs", "1", "--batch-size", "16")
    assert p.returncode == 2, show(p)
    assert "chunk train/cls/c/1/" in p.stderr and "is corrupt" in p.stderr and "Traceback" not in p.stderr, show(p)
    assert not (tmp_path / "student" / "model.safetensors").exists()


@pytest.mark.parametrize("codecs, dtype, says", [
    ([{"name": "bytes"}, {"name": "numcodecs.pickle", "configuration": {}}], "int64", "uses codecs ['bytes', 'numcodecs.pickle']"),
    ([{"name": "vlen-utf8"}], "string", "has data type 'string'"),
])
def test_a_store_asking_for_unsafe_decoding_is_refused(copy, codecs, dtype, says):
    """Nothing in a store may execute on load: arrays with object/string data or unknown codecs are refused."""
    meta_path = copy / "train" / "labels" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"], meta["data_type"] = codecs, dtype
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(pkd_cache.PkdCacheError, match=re.escape(says)):
        list(pkd_cache.open_store(str(copy)).batches("train", 16))
    p = cli_in_process("verify", copy)
    assert p.returncode != 0 and says in p.stdout + p.stderr and "Traceback" not in p.stderr, show(p)
