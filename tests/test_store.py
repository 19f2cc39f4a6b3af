"""The store: dump, read back with plain zarr, compare with a fresh teacher forward; metadata; batches."""
import json

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import pkd_cache
from pkd_cache.data.loading import load_examples
from pkd_cache.data.tasks import get_task
from pkd_cache.errors import PkdCacheError


def test_round_trip_with_plain_zarr_matches_fresh_teacher_forward(store_path, teacher_dir, data_dir):
    root = zarr.open_group(str(store_path), mode="r")  # plain zarr, no pkd_cache reader
    assert root.attrs["complete"] is True and root.attrs["format"] == "pkd-cache"
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    for split in ("train", "validation"):
        ex = load_examples(get_task("sst2"), split, str(data_dir))
        g = root[split]
        assert g["cls"].shape == (len(ex), 5, 32) and g["cls"].dtype == np.float16
        assert g["logits"].shape == (len(ex), 2)
        np.testing.assert_array_equal(g["labels"][:], ex.labels)
        enc = tok(ex.text_a, truncation=True, max_length=24, padding="max_length", return_tensors="pt")
        np.testing.assert_array_equal(g["input_ids"][:], enc["input_ids"].numpy())
        np.testing.assert_array_equal(g["attention_mask"][:], enc["attention_mask"].numpy())
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        cls = torch.stack([h[:, 0] for h in out.hidden_states], dim=1).numpy()
        np.testing.assert_allclose(g["logits"][:], out.logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(g["cls"][:].astype(np.float32), cls, atol=2e-3, rtol=2e-3)


def test_metadata_describes_teacher_tokenizer_task_and_data(store_path):
    m = pkd_cache.open_store(str(store_path)).info()
    assert m["format_version"] == 1 and m["complete"] is True
    assert m["teacher"]["num_layers"] == 4 and m["teacher"]["hidden_size"] == 32
    assert len(m["teacher"]["weights_fingerprint"]) == 64
    assert m["teacher"]["config"]["num_hidden_layers"] == 4
    assert len(m["tokenizer"]["vocab_fingerprint"]) == 64
    assert m["task"]["name"] == "sst2" and m["task"]["label_names"] == ["negative", "positive"]
    assert m["splits"]["train"]["num_examples"] == 160 and m["splits"]["validation"]["num_examples"] == 48
    assert len(m["splits"]["train"]["data_fingerprint"]) == 64
    assert m["max_seq_length"] == 24 and m["cls_dtype"] == "float16"
    assert m["package_version"] == pkd_cache.__version__ and m["created_at"] and m["completed_at"]
    json.dumps(m)  # all JSON


def test_arrays_are_chunked_along_examples_and_cls_per_layer(store_path):
    g = zarr.open_group(str(store_path), mode="r")["train"]
    assert g["cls"].chunks == (64, 1, 32) and g["input_ids"].chunks == (64, 24) and g["logits"].chunks == (64, 2)
    meta = json.loads((store_path / "train" / "cls" / "zarr.json").read_text())
    assert any(c["name"] == "blosc" for c in meta["codecs"])


def test_batches_cover_every_example_once_and_are_seeded(store_path):
    store = pkd_cache.open_store(str(store_path))
    cls = store.array("train", "cls")[:, -1].astype(np.float32)  # a per-example signature
    assert len(np.unique(cls, axis=0)) == 160

    def order(seed, epoch=0):
        rows = []
        for b in store.batches("train", 16, shuffle=True, seed=seed, epoch=epoch):
            assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "logits", "cls"}
            for r in b["cls"][:, -1].float().numpy():
                rows.append(int(np.where((cls == r).all(axis=1))[0][0]))
        return rows

    a, b, c, d = order(0), order(0), order(1), order(0, epoch=1)
    assert sorted(a) == list(range(160))  # every example exactly once
    assert a == b and a != c and a != d and a != sorted(a)


def test_ordered_batches_follow_the_store_and_trim_padding(store_path):
    store = pkd_cache.open_store(str(store_path))
    labels = np.concatenate([b["labels"].numpy() for b in store.batches("validation", 10, shuffle=False)])
    np.testing.assert_array_equal(labels, store.array("validation", "labels")[:])
    for b in store.batches("validation", 10, shuffle=False):
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())


def test_layer_selection_returns_only_mapped_layers(store_path):
    store = pkd_cache.open_store(str(store_path))
    b = next(store.batches("train", 8, shuffle=False, layers=[2, 4]))
    full = store.array("train", "cls")[:8]
    np.testing.assert_array_equal(b["cls"].numpy(), full[:, [2, 4]])


def test_existing_out_is_refused_then_replaced_with_overwrite(tmp_path, teacher_dir, data_dir, store_path):
    out = tmp_path / "s.zarr"
    cfg = pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir), out=str(out),
                               max_seq_length=16, max_examples=20)
    pkd_cache.dump(cfg)
    stamp = (out / "zarr.json").read_text()
    assert pkd_cache.dump(cfg).num_examples("train") == 20  # the same dump again: a cache hit, nothing written
    assert (out / "zarr.json").read_text() == stamp
    cfg.max_seq_length = 24
    with pytest.raises(PkdCacheError, match="holds a different dump"):
        pkd_cache.dump(cfg)
    assert (out / "zarr.json").read_text() == stamp
    cfg.overwrite = True
    store = pkd_cache.dump(cfg)
    assert store.num_examples("train") == 20 and store.info()["max_seq_length"] == 24


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path, teacher_dir, data_dir):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(PkdCacheError, match="not a pkd-cache store"):
        pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                            out=str(out), overwrite=True, max_examples=5))
    assert (out / "thesis.tex").read_text() == "keep me"


def test_incomplete_store_is_refused_for_reading(tmp_path, store_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(PkdCacheError, match="not complete"):
        pkd_cache.open_store(str(copy))
    from pkd_cache.store import open_store

    assert open_store(str(copy), require_complete=False).complete is False


def test_newer_format_and_non_stores_are_refused(tmp_path, store_path):
    import shutil

    copy = tmp_path / "new.zarr"
    shutil.copytree(store_path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(PkdCacheError, match="format version 99"):
        pkd_cache.open_store(str(copy))
    with pytest.raises(PkdCacheError, match="does not exist"):
        pkd_cache.open_store(str(tmp_path / "nope.zarr"))
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.attrs["x"] = 1
    with pytest.raises(PkdCacheError, match="not a pkd-cache store"):
        pkd_cache.open_store(str(tmp_path / "plain.zarr"))


def test_float32_cls_dtype(tmp_path, teacher_dir, data_dir):
    out = tmp_path / "f32.zarr"
    store = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                                out=str(out), max_seq_length=16, max_examples=10, dtype="float32"))
    assert store.array("train", "cls").dtype == np.float32 and store.info()["cls_dtype"] == "float32"


def test_bucketed_and_padded_dumps_agree_and_are_written_in_order(tmp_path, teacher_dir, data_dir, store_path):
    """Length bucketing reorders the teacher's batches inside a chunk, never the stored rows."""
    out = tmp_path / "padded.zarr"
    padded = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                                 out=str(out), max_seq_length=24, batch_size=16, chunk_size=64,
                                                 pad_to_max_length=True))
    bucketed = pkd_cache.open_store(str(store_path))
    for split in ("train", "validation"):
        for name in ("input_ids", "attention_mask", "labels"):
            np.testing.assert_array_equal(padded.array(split, name)[:], bucketed.array(split, name)[:])
        np.testing.assert_allclose(padded.array(split, "logits")[:], bucketed.array(split, "logits")[:], atol=1e-5)
        np.testing.assert_allclose(padded.array(split, "cls")[:].astype(np.float32),
                                   bucketed.array(split, "cls")[:].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_chunk_batches_bucket_by_length_and_cover_the_chunk():
    from pkd_cache.teacher.run import chunk_batches

    lengths = np.array([3, 9, 5, 9, 1, 7, 2])
    batches = chunk_batches(lengths, 3, bucketed=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert [lengths[b].tolist() for b in batches] == [[9, 9, 7], [5, 3, 2], [1]]
    assert [b.tolist() for b in chunk_batches(lengths, 3, bucketed=False)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_sort_windows_are_whole_chunks_that_cover_the_split():
    from pkd_cache.commands.dump_shares import sort_windows

    assert sort_windows(1000, 64, 200) == [(0, 192), (192, 384), (384, 576), (576, 768), (768, 960), (960, 1000)]
    assert sort_windows(100, 64, 10) == [(0, 64), (64, 100)]  # at least one chunk
    assert sort_windows(100, 64, 8192) == [(0, 100)]


def test_sort_window_changes_only_the_batches_never_the_rows(tmp_path, teacher_dir, data_dir, store_path):
    """One chunk per window against the fixture's one window for the whole split: the same rows, in order."""
    small = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                                out=str(tmp_path / "w.zarr"), max_seq_length=24, batch_size=16,
                                                chunk_size=64, sort_window=64))
    whole = pkd_cache.open_store(str(store_path))
    assert small.info()["settings"]["sort_window"] == 64 and whole.info()["settings"]["sort_window"] == 8192
    assert small.meta.cache_key != whole.meta.cache_key
    assert small.num_examples("train") > 64  # several chunks, so the windows differ
    for split in ("train", "validation"):
        np.testing.assert_array_equal(small.array(split, "input_ids")[:], whole.array(split, "input_ids")[:])
        np.testing.assert_allclose(small.array(split, "logits")[:], whole.array(split, "logits")[:], atol=1e-5)
        np.testing.assert_allclose(small.array(split, "cls")[:].astype(np.float32),
                                   whole.array(split, "cls")[:].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_a_write_error_in_the_background_writer_reaches_the_caller(tmp_path, teacher_dir, data_dir, monkeypatch):
    from pkd_cache.store.backends import zarr_backend

    def broken(self, split, start, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr_backend.StoreWriter, "write", broken)
    out = tmp_path / "full.zarr"
    with pytest.raises(OSError, match="No space left"):
        pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                            out=str(out), max_seq_length=16, chunk_size=16))
    assert zarr.open_group(str(out), mode="r").attrs["complete"] is False


def test_bf16_precision_on_cpu_stays_close(tmp_path, teacher_dir, data_dir, store_path):
    s = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                            out=str(tmp_path / "bf16.zarr"), max_seq_length=24, chunk_size=64,
                                            precision="bf16"))
    ref = pkd_cache.open_store(str(store_path))
    np.testing.assert_allclose(s.array("validation", "logits")[:], ref.array("validation", "logits")[:], atol=0.1)


def test_int8_store_dequantises_close_to_float_and_keeps_directions(tmp_path, teacher_dir, data_dir, store_path):
    from pkd_cache.store.quantize import dequantize_int8, quantize_int8

    x = np.random.default_rng(0).standard_normal((5, 3, 16)).astype(np.float32)
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.shape == (5, 3)
    np.testing.assert_allclose(dequantize_int8(q, scale, np.float32), x, atol=float(scale.max()) / 2 + 1e-7)
    q0, s0 = quantize_int8(np.zeros((2, 4), np.float32))
    assert (q0 == 0).all() and (dequantize_int8(q0, s0) == 0).all()

    s = pkd_cache.dump(pkd_cache.DumpConfig(teacher=str(teacher_dir), task="sst2", data_dir=str(data_dir),
                                            out=str(tmp_path / "int8.zarr"), max_seq_length=24, chunk_size=64,
                                            dtype="int8"))
    raw = zarr.open_group(str(tmp_path / "int8.zarr"), mode="r")["train"]
    assert raw["cls"].dtype == np.int8 and raw["cls_scale"].shape == (160, 5)
    ref = pkd_cache.open_store(str(store_path)).array("train", "cls")[:].astype(np.float32)
    got = np.concatenate([b["cls"].float().numpy() for b in s.batches("train", 32, shuffle=False, layers=[1, 3])])
    cos = (got * ref[:, [1, 3]]).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref[:, [1, 3]], axis=-1)
    assert cos.min() > 0.999
    want = dequantize_int8(raw["cls"][:][:, [1, 3]], raw["cls_scale"][:][:, [1, 3]])
    np.testing.assert_array_equal(got, want.astype(np.float32))
