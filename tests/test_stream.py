"""The epoch order is a pure function with the invariants a sampler needs; the reader follows it exactly."""
import numpy as np
import pytest

import pkd_cache
from pkd_cache.stream import epoch_groups


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
    store = pkd_cache.open_store(str(store_path))

    def broken(*a, **k):
        raise OSError("chunk unreadable")

    monkeypatch.setattr(store, "read", broken)
    with pytest.raises(OSError, match="unreadable"):
        list(store.batches("train", 16))


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
