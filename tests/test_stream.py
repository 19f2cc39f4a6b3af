"""The epoch order is a pure function with the invariants a sampler needs; the reader follows it exactly."""
import json

import numpy as np
import torch
import pytest

import pkd_cache
from pkd_cache.store.stream import epoch_groups


@pytest.mark.parametrize("n,chunk,k", [(160, 64, 8), (1000, 64, 3), (7, 10, 2), (1024, 128, 1)])
def test_each_epoch_is_a_permutation_made_of_whole_chunk_groups(n, chunk, k):
    for epoch in range(3):
        groups = epoch_groups(n, chunk, True, seed=5, epoch=epoch, shuffle_chunks=k)
        rows = np.concatenate([g.rows for g in groups])
        assert sorted(rows.tolist()) == list(range(n))
        chunk_ids = [c for g in groups for c in g.chunks]
        assert sorted(chunk_ids) == list(range(-(-n // chunk)))
        for g in groups:
            assert len(g.chunks) <= k and set((g.rows // chunk).tolist()) == set(g.chunks)


def test_order_is_seeded_per_epoch_and_identity_without_shuffle():
    def order(seed, epoch):
        return np.concatenate([g.rows for g in epoch_groups(1000, 64, True, seed, epoch, 4)]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    plain = np.concatenate([g.rows for g in epoch_groups(1000, 64, False, 0, 0, 4)])
    assert plain.tolist() == list(range(1000))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reader_yields_the_planned_order(store_path, prefetch):
    store = pkd_cache.open_store(str(store_path))
    logits = store.array("train", "logits")[:]
    got = np.concatenate([b["logits"].numpy() for b in store.batches("train", 24, seed=3, epoch=1,
                                                                      shuffle_chunks=2, prefetch=prefetch)])
    plan = np.concatenate([g.rows for g in epoch_groups(160, 64, True, 3, 1, 2)])
    np.testing.assert_array_equal(got, logits[plan])


def test_reader_errors_reach_the_consumer(store_path, monkeypatch):
    from pkd_cache.store.backends.zarr_backend import ChunkReader

    store = pkd_cache.open_store(str(store_path))

    def broken(*a, **k):
        raise OSError("chunk unreadable")

    monkeypatch.setattr(ChunkReader, "read_into", broken)
    with pytest.raises(OSError, match="unreadable"):
        list(store.batches("train", 16))


def test_a_damaged_chunk_is_a_clear_error(store_path, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    chunk = sorted((copy / "train" / "cls" / "c").rglob("*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(pkd_cache.PkdCacheError, match=r"train/cls/c/\d+/\d+/0 has 40 bytes, the manifest records"):
        pkd_cache.open_store(str(copy))  # a stat per chunk at open: found before any training starts


@pytest.mark.parametrize("layers", [None, [3, 1]])
def test_direct_chunk_reads_match_zarr(store_path, layers):
    """pkd-cache's own chunk reads (chunk files decoded in place) give what zarr-python reads from the store."""
    import zarr

    store = pkd_cache.open_store(str(store_path))
    fast = list(store.batches("train", 24, seed=1, layers=layers, shuffle_chunks=2))
    cls = zarr.open_group(str(store_path), mode="r")["train"]["cls"][:]
    np.testing.assert_array_equal(store.array("train", "cls")[:], cls)
    rows = np.concatenate([g.rows for g in epoch_groups(160, 64, True, 1, 0, 2)])
    want = cls[rows] if layers is None else cls[rows][:, layers]
    np.testing.assert_array_equal(np.concatenate([b["cls"].numpy() for b in fast]), want)


def test_stopping_early_releases_the_reader_thread(store_path):
    import threading
    import time

    store = pkd_cache.open_store(str(store_path))
    it = store.batches("train", 8, shuffle_chunks=1, prefetch=1)
    next(it)
    it.close()  # what a training loop's `break` does to the generator
    deadline = time.monotonic() + 10
    while any(t.name == "pkd-cache-reader" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "pkd-cache-reader" for t in threading.enumerate())


def test_stores_with_all_layers_in_one_chunk_read_the_same(store_path, tmp_path):
    """Stores written before per-layer CLS chunks (one chunk = all L+1 layers) read identically."""
    import shutil

    import zarr

    from pkd_cache.store.integrity import crc32c
    from pkd_cache.store.format import compressor

    copy = tmp_path / "whole.zarr"
    shutil.copytree(store_path, copy)
    g = zarr.open_group(str(copy / "train"), mode="r+")
    cls = g["cls"][:]
    assert g["cls"].chunks[1] == 1
    del g["cls"]
    g.create_array("cls", shape=cls.shape, chunks=(64,) + cls.shape[1:], dtype=cls.dtype, fill_value=0,
                   compressors=compressor("cls", 2))[:] = cls
    manifest = json.loads((copy / "checksums.json").read_text())  # record the rewritten chunks' checksums
    manifest["chunks"] = {k: v for k, v in manifest["chunks"].items() if not k.startswith("train/cls/")}
    for f in (copy / "train" / "cls" / "c").rglob("*"):
        if f.is_file():
            manifest["chunks"][str(f.relative_to(copy))] = [f.stat().st_size, crc32c(f.read_bytes())]
    (copy / "checksums.json").write_text(json.dumps(manifest))
    for layers in (None, [4, 0, 2]):
        a = list(pkd_cache.open_store(str(store_path)).batches("train", 24, seed=2, layers=layers, shuffle_chunks=2))
        b = list(pkd_cache.open_store(str(copy)).batches("train", 24, seed=2, layers=layers, shuffle_chunks=2))
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x["cls"], y["cls"], rtol=0, atol=0)


@pytest.mark.parametrize("world, start", [(2, 0), (3, 0), (2, 3)])
def test_ranks_batches_together_are_the_one_process_batches(store_path, world, start):
    import torch

    store = pkd_cache.open_store(str(store_path))
    kw = dict(shuffle=True, seed=3, epoch=1, fields=("input_ids", "attention_mask", "labels", "logits"), start_batch=start)
    one = list(store.batches("train", 24, **kw))
    ranks = [list(store.batches("train", 24, shard=(r, world), **kw)) for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)  # 160 rows: the last batch (16) is >= world, so it is kept
    for i, batch in enumerate(one):
        parts = [r[i] for r in ranks]
        assert [len(p["labels"]) for p in parts] == [len(x) for x in np.array_split(np.arange(len(batch["labels"])),
                                                                                      world)]
        torch.testing.assert_close(torch.cat([p["labels"] for p in parts]), batch["labels"])
        torch.testing.assert_close(torch.cat([p["logits"] for p in parts]), batch["logits"])
        for p, rows in zip(parts, np.array_split(np.arange(len(batch["labels"])), world)):
            width = p["input_ids"].shape[1]  # each part is cut to its own longest sequence
            torch.testing.assert_close(p["input_ids"], batch["input_ids"][rows, :width])
            assert not batch["input_ids"][rows, width:].any()


def test_every_chunk_source_reads_the_same_chunks(store_path):
    """The one source protocol (store/backend.py): the store's checked source and the in-memory one (online KD)
    hand out the same chunks, names aside, for every array; the stream reads either alike."""
    from pkd_cache.store.memory import ArrayArray, ArrayChunkReader
    from pkd_cache.store.stream import iter_batches

    store = pkd_cache.open_store(str(store_path))
    for name in ("input_ids", "labels", "logits"):
        stored = store.chunk_reader("train", name)
        memory = ArrayChunkReader(ArrayArray(store.array("train", name)[:], stored.chunks[0], f"train/{name}"))
        assert (memory.shape, memory.chunks, memory.dtype) == (stored.shape, stored.chunks, stored.dtype)
        for c in range(-(-stored.shape[0] // stored.chunks[0])):
            coords = (c,) + (0,) * (len(stored.shape) - 1)
            np.testing.assert_array_equal(memory.read_into(coords, memory.buffer()),
                                          stored.read_into(coords, stored.buffer()))

    class InMemory:  # what the stream needs of a source: its example count and chunk sources
        def num_examples(self, split):
            return store.num_examples(split)

        def chunk_reader(self, split, name):
            rows = store.chunk_reader(split, name).chunks[0]
            return ArrayChunkReader(ArrayArray(store.array(split, name)[:], rows, f"{split}/{name}"))

        def array(self, split, name):
            return store.array(split, name)

    fields = ("input_ids", "attention_mask", "labels", "logits")
    a = list(iter_batches(store, "train", 24, seed=4, fields=fields, shuffle_chunks=2))
    b = list(iter_batches(InMemory(), "train", 24, seed=4, fields=fields, shuffle_chunks=2))
    for x, y in zip(a, b, strict=True):
        for k in fields:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
