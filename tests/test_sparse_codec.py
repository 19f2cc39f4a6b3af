"""The on-disk coding of sparse token-level targets (pkd_cache/store/sparse_codec.py): exact round trips, the sizes
its layout promises, ValueError on corrupt chunks (never another exception, never a silent misread), and the effect
of float16 log-probs on TopKKDLoss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pkd_cache.store import sparse_codec as sc
from pkd_cache.student.sparse_kd import TopKKDLoss, sample_targets, topk_targets

VOCABS = (2, 3, 1000, 30_522, 2 ** 17, 151_936)


def _sampled(rng, tokens: int, n: int, vocab: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random sample:n targets in sample_targets' layout: per token m unique ids (ascending) and counts summing to n."""
    rows = []
    for _ in range(tokens):
        m = int(rng.integers(1, min(n, vocab) + 1)) if rng.random() < spread else 1
        ids = np.sort(rng.choice(vocab, size=m, replace=False))
        cuts = np.sort(rng.choice(np.arange(1, n), size=m - 1, replace=False)) if m > 1 else np.zeros(0, int)
        rows.append((ids, np.diff(np.concatenate([[0], cuts, [n]]))))
    width = max((len(i) for i, _ in rows), default=0)
    ids, counts = np.zeros((tokens, width), np.int64), np.zeros((tokens, width), np.int64)
    for t, (i, c) in enumerate(rows):
        ids[t, :len(i)], counts[t, :len(c)] = i, c
    return ids, counts


def _roundtrip(ids, counts, n, vocab):
    arrays = sc.encode_sampled(ids, counts, n, vocab)
    got_ids, got_counts = sc.decode_sampled(arrays, n, vocab)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_counts, counts)
    assert got_ids.dtype == got_counts.dtype == np.int64
    return arrays


def _layout_bytes(ids, counts, n, vocab) -> dict[str, int]:
    """The byte counts the module docstring's layout gives, computed here independently, with Python ints."""
    id_bits = count_bits = 0
    for row_ids, row_counts in zip(ids.tolist(), counts.tolist()):
        m = sum(c > 0 for c in row_counts)
        k = max(1, (vocab - m) // (m + 1)).bit_length() - 1
        prev = -1
        for i in row_ids[:m]:
            id_bits += ((i - prev - 1) >> k) + 1 + k
            prev = i
        count_bits += sum(2 * (c.bit_length() - 1) + 1 for c in row_counts[:m - 1])
    return {"n_unique": len(ids) * (1 if n <= 255 else 2 if n <= 65535 else 4),
            "ids": math.ceil(id_bits / 8), "counts": math.ceil(count_bits / 8)}


def test_id_bits():
    assert [sc.id_bits(v) for v in (1, 2, 3, 4, 5, 30_522, 2 ** 17, 2 ** 17 + 1, 128_256, 151_936)] == \
        [0, 1, 2, 2, 3, 15, 17, 18, 17, 18]
    with pytest.raises(ValueError):
        sc.id_bits(0)


@pytest.mark.parametrize("bits", [1, 2, 7, 8, 9, 15, 17, 18, 31, 40])
def test_pack_ids_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 1001):
        ids = rng.integers(0, 2 ** bits, size=count)
        ids[:2] = [2 ** bits - 1, 0][:count]
        packed = sc.pack_ids(ids, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
        np.testing.assert_array_equal(sc.unpack_ids(packed, bits, count), ids)


def test_pack_ids_bit_order():
    """MSB first, back to back: 5 (101) and 3 (011) in 3 bits are 101011 + 2 bits of 0 padding."""
    assert sc.pack_ids(np.array([5, 3]), 3).tolist() == [0b10101100]


def test_pack_ids_rejects():
    packed = sc.pack_ids(np.arange(10), 5)
    for bad in (packed[:-1], np.concatenate([packed, [0]]).astype(np.uint8)):
        with pytest.raises(ValueError, match="bytes"):
            sc.unpack_ids(bad, 5, 10)
    padded = packed.copy()
    padded[-1] |= 1  # 50 bits in 7 bytes: the last 6 bits are padding and must be 0
    with pytest.raises(ValueError, match="padding"):
        sc.unpack_ids(padded, 5, 10)
    with pytest.raises(ValueError, match="uint8"):
        sc.unpack_ids(packed.astype(np.int64), 5, 10)
    for ids in (np.array([32]), np.array([-1]), np.array([0.5])):
        with pytest.raises(ValueError):
            sc.pack_ids(ids, 5)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("n", [1, 12, 64, 300])
def test_sampled_round_trip_and_layout_size(vocab, n):
    rng = np.random.default_rng(vocab * 1000 + n)
    ids, counts = _sampled(rng, 200, n, vocab)
    arrays = _roundtrip(ids, counts, n, vocab)
    assert {key: a.nbytes for key, a in arrays.items()} == _layout_bytes(ids, counts, n, vocab)
    assert all(a.ndim == 1 for a in arrays.values()) and arrays["ids"].dtype == arrays["counts"].dtype == np.uint8


@pytest.mark.parametrize("vocab", [2, 2 ** 17, 151_936])
def test_sampled_edge_cases(vocab):
    n = 64
    m = min(n, vocab)
    # every draw a different id (M = n where the vocabulary allows), including the first and last ids
    top = np.concatenate([[0], np.sort(np.random.default_rng(0).choice(np.arange(1, vocab - 1), m - 2,
                                                                      replace=False)), [vocab - 1]])
    all_unique = (top[None, :], np.full((1, m), n // m) + (np.arange(m) < n % m))
    one_id = (np.array([[vocab - 1]]), np.array([[n]]))  # one id drawn n times
    for ids, counts in (all_unique, one_id, (np.array([[0]]), np.array([[n]]))):
        _roundtrip(ids, counts, n, vocab)
    arrays = _roundtrip(np.array([[vocab - 1]]), np.array([[1]]), 1, vocab)  # n = 1
    assert arrays["counts"].size == 0
    empty = _roundtrip(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), n, vocab)  # T = 0
    assert all(a.size == 0 for a in empty.values())
    mixed_ids, mixed_counts = _sampled(np.random.default_rng(1), 50, n, vocab, spread=0.3)  # padding in most rows
    _roundtrip(mixed_ids, mixed_counts, n, vocab)


def test_sampled_matches_sample_targets():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 5000, generator=g)
    ids, counts = sample_targets(logits, 50, generator=g)
    arrays = _roundtrip(ids.numpy(), counts.numpy(), 50, 5000)
    got_ids, got_counts = sc.decode_sampled(arrays, 50, 5000)
    assert torch.equal(torch.from_numpy(got_ids), ids) and torch.equal(torch.from_numpy(got_counts), counts)


def test_encode_sampled_rejects():
    ids, counts = np.array([[3, 7]]), np.array([[2, 2]])
    sc.encode_sampled(ids, counts, 4, 8)
    cases = [(np.array([[3, 8]]), counts, 4, 8),  # id >= vocab
             (ids, np.array([[2, 1]]), 4, 8),  # sum != n
             (np.array([[7, 3]]), counts, 4, 8),  # not ascending
             (np.array([[3, 3]]), counts, 4, 8),  # not unique
             (ids, np.array([[0, 4]]), 4, 8),  # padding before a real id
             (np.array([[3, 5]]), np.array([[4, 0]]), 4, 8),  # padding with an id other than 0
             (ids, np.array([[2]]), 4, 8)]  # shapes differ
    for case in cases:
        with pytest.raises(ValueError):
            sc.encode_sampled(*case)


def _valid(vocab=1000, n=64, tokens=40, seed=0):
    ids, counts = _sampled(np.random.default_rng(seed), tokens, n, vocab)
    return sc.encode_sampled(ids, counts, n, vocab), n, vocab


def test_decode_sampled_rejects_corrupt_chunks():
    arrays, n, vocab = _valid()
    for key in ("ids", "counts"):
        for bad in (arrays[key][:-1], np.concatenate([arrays[key], [0]]).astype(np.uint8), arrays[key][:0]):
            with pytest.raises(ValueError, match=key[:-1]):
                sc.decode_sampled({**arrays, key: bad}, n, vocab)
    with pytest.raises(ValueError, match="uint8"):
        sc.decode_sampled({**arrays, "ids": arrays["ids"].astype(np.int16)}, n, vocab)
    with pytest.raises(ValueError, match="no 'counts'"):
        sc.decode_sampled({"n_unique": arrays["n_unique"], "ids": arrays["ids"]}, n, vocab)
    for m in (np.array([0]), np.array([n + 1]), np.array([[1]])):
        with pytest.raises(ValueError, match="n_unique"):
            sc.decode_sampled({**arrays, "n_unique": m}, n, vocab)
    # an id >= vocab: id 1010 coded for V = 1023 has the same Rice parameter as for V = 1000 (m = 1: k = 8)
    beyond = sc.encode_sampled(np.array([[1010]]), np.array([[n]]), n, 1023)
    with pytest.raises(ValueError, match="vocabulary"):
        sc.decode_sampled(beyond, n, 1000)
    # stored counts summing to n or more (here 15 > n = 10): no draw left for the last id
    over = sc.encode_sampled(np.array([[1, 2]]), np.array([[15, 5]]), 20, vocab)
    with pytest.raises(ValueError, match="counts"):
        sc.decode_sampled(over, 10, vocab)
    over = sc.encode_sampled(np.array([[1, 2]]), np.array([[40, 24]]), 64, vocab)
    with pytest.raises(ValueError, match="above n"):
        sc.decode_sampled(over, 10, vocab)


def test_decode_sampled_fuzz_only_value_errors():
    """Random bit flips, byte drops and n_unique changes in valid chunks: each decode either raises ValueError or
    returns targets that satisfy every invariant (a flip can make another valid chunk)."""
    rng = np.random.default_rng(5)
    arrays, n, vocab = _valid(tokens=8)
    decoded = 0
    for trial in range(400):
        bad = {key: a.copy() for key, a in arrays.items()}
        key = ("ids", "counts", "n_unique")[trial % 3]
        if bad[key].size and rng.random() < 0.8:
            pos = rng.integers(bad[key].size)
            bad[key][pos] ^= np.array(1 << rng.integers(8), dtype=bad[key].dtype)
        else:
            bad[key] = bad[key][:-1]
        try:
            ids, counts = sc.decode_sampled(bad, n, vocab)
        except ValueError:
            continue
        decoded += 1
        real = counts > 0
        assert (counts.sum(1) == n).all() and ids.max() < vocab and (ids[~real] == 0).all()
        assert not (real[:, 1:] & (np.diff(ids, axis=1) <= 0)).any()
    assert decoded < 400


def _teachers(tokens=128, vocab=32_000, seed=0):
    """Realistic teachers: Zipf-like over a random order of the vocabulary (per token), random temperatures; a
    student near them. Yields (student, teacher) for a typical and a peaked (twice the exponent) teacher."""
    g = torch.Generator().manual_seed(seed)
    log_rank = torch.log(torch.argsort(torch.rand(tokens, vocab, generator=g), dim=1).double() + 2)
    alpha = 2.45 * torch.exp(0.35 * torch.randn(tokens, 1, generator=g, dtype=torch.float64))
    noise = 0.5 * torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    student_noise = torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    for peaked in (1.0, 2.0):
        teacher = -peaked * alpha * log_rank + noise
        yield teacher + student_noise, teacher


@pytest.mark.parametrize("vocab,k", [(2, 1), (2, 2), (1000, 12), (2 ** 17, 64), (151_936, 128)])
def test_topk_round_trip_and_layout_size(vocab, k):
    rng = np.random.default_rng(k)
    tokens = 100
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(tokens)])
    lp = np.log(rng.dirichlet(np.ones(k + 1), size=tokens)[:, :k] + 1e-30)
    if k == vocab:
        lp = np.log(rng.dirichlet(np.ones(k), size=tokens))
    arrays = sc.encode_topk(ids, lp, vocab)
    got_ids, got_lp, rest = sc.decode_topk(arrays, k, vocab)
    order = np.argsort(ids, axis=1)
    np.testing.assert_array_equal(got_ids, np.take_along_axis(ids, order, 1))
    np.testing.assert_array_equal(got_lp, np.take_along_axis(lp, order, 1).astype(np.float16).astype(np.float32))
    mass = np.exp(got_lp.astype(np.float64)).sum(1)
    np.testing.assert_allclose(np.exp(rest.astype(np.float64)), np.maximum(0, 1 - mass), atol=1e-6)
    assert arrays["logprobs"].dtype == np.float16 and arrays["logprobs"].shape == (tokens * k,)
    sorted_ids = np.take_along_axis(ids, order, 1)
    assert arrays["ids"].nbytes == _layout_bytes(sorted_ids, np.ones_like(ids), k, vocab)["ids"]
    empty = sc.encode_topk(np.zeros((0, k), np.int64), np.zeros((0, k)), vocab)
    assert [a.shape for a in sc.decode_topk(empty, k, vocab)] == [(0, k), (0, k), (0,)]


def test_topk_rejects():
    ids, lp = np.array([[5, 1, 9]]), np.log(np.array([[0.5, 0.2, 0.1]]))
    arrays = sc.encode_topk(ids, lp, 10)
    for bad_ids, bad_lp, vocab in ((np.array([[5, 1, 10]]), lp, 10), (np.array([[5, 1, 5]]), lp, 10),
                                   (ids, -lp, 10), (ids, np.full((1, 3), np.nan), 10), (ids, lp[:, :2], 10),
                                   (ids, np.zeros((1, 3)), 10)):
        with pytest.raises(ValueError):
            sc.encode_topk(bad_ids, bad_lp, vocab)
    for bad in ({"ids": arrays["ids"]}, {**arrays, "logprobs": arrays["logprobs"][:2]},
                {**arrays, "logprobs": arrays["logprobs"].astype(np.float32)},
                {**arrays, "logprobs": np.array([0.0, -1, np.nan], np.float16)},
                {**arrays, "logprobs": np.array([0.0, 0, -1], np.float16)},  # probabilities summing to 2.4
                {**arrays, "ids": arrays["ids"][:-1]}, {**arrays, "ids": np.concatenate([arrays["ids"], [0]])}):
        with pytest.raises(ValueError):
            sc.decode_topk(bad, 3, 10)


def test_float16_logprobs_barely_move_topk_loss():
    """The realistic case of the module docstring: the TopKKDLoss value from float16 log-probs (and the rest it
    derives from them) vs from the float64 ones, for ce and kl, at typical and peaked teachers."""
    for student, teacher in _teachers():
        for k in (12, 64):
            ids, lp = topk_targets(teacher, k)
            got_ids, got_lp, rest = sc.decode_topk(sc.encode_topk(ids.numpy(), lp.numpy(), 32_000), k, 32_000)
            exact_rest = (1 - lp.exp().sum(-1)).clamp_min(0)
            assert (torch.from_numpy(rest).double().exp() - exact_rest).abs().max() < 5e-4
            for objective in ("ce", "kl"):
                loss = TopKKDLoss(objective=objective)
                exact = loss(student, ids, lp)
                stored = loss(student, torch.from_numpy(got_ids), torch.from_numpy(got_lp).double())
                assert abs(float(stored / exact) - 1) < 1e-3, (k, objective, float(exact), float(stored))
