"""The compiled pieces (setup.py: store/_bits.c, teacher/_sampler.c): built where CI promises a compiler, and
agreeing with the numpy / torch code they stand in for. The finiteness check's bit-level agreement is tested in
test_tampered_stores.py; the sampler's statistics in test_token_targets.py, which runs its tests on both paths."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from pkd_cache.teacher import token_targets as tt


@pytest.mark.parametrize("module", ["pkd_cache.store._bits", "pkd_cache.teacher._sampler"])
def test_the_compiled_pieces_are_built_in_ci(module):
    """Both builds are optional; CI has a compiler, so a build that silently failed (and the CPU it costs: B3 and
    the token-store dump in benchmarks/RESULTS.md) fails here."""
    if not os.environ.get("CI"):
        pytest.skip("only CI promises a C compiler")
    built = importlib.import_module(module)
    if module.endswith("_sampler"):
        assert built.openmp, "CI's gcc has OpenMP: the sampler should run on torch's threads (setup.py)"


def _draws(ids: torch.Tensor, counts: torch.Tensor) -> list[np.ndarray]:
    return [np.repeat(i.numpy(), c.numpy()) for i, c in zip(ids, counts)]


@pytest.mark.parametrize("vocab, n, temperature", [(4096, 64, 1.0), (4096, 64, 0.5), (1000, 33, 2.0), (7, 5, 1.0),
                                                   (1, 3, 1.0), (20_000, 12, 1.0)])
def test_the_compiled_sampler_draws_what_the_torch_one_does(vocab, n, temperature):
    """The same draws row for row, but for draws within float rounding of a CDF step (the two sum the CDF in
    different orders), which go to the neighbouring id of nonzero probability: a few rows in 10^4 at most."""
    if tt._sample_rows is None:
        pytest.skip("teacher/_sampler.c was not built here")
    rows = 2048
    logits = 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    u = tt.counter_uniforms(7, 10 ** 6, rows, n)
    ours, theirs = _draws(*tt._compiled_draws(logits, n, u, temperature)), \
        _draws(*tt._torch_draws(logits, n, u, temperature))
    differ = [r for r in range(rows) if not np.array_equal(ours[r], theirs[r])]
    assert len(differ) <= 3, len(differ)
    p = torch.softmax(logits.double() / temperature, -1).numpy()
    for r in differ:
        moved = np.flatnonzero(ours[r] != theirs[r])
        assert len(moved) <= 2, (r, ours[r], theirs[r])
        for j in moved:  # neighbours: the ids between the two draws hold no mass beyond rounding
            lo, hi = sorted((ours[r][j], theirs[r][j]))
            assert p[r, lo + 1:hi].sum() < 1e-6, (r, lo, hi)


def test_the_compiled_sampler_refuses_rows_with_no_finite_probability_wherever_they_are():
    if tt._sample_rows is None:
        pytest.skip("teacher/_sampler.c was not built here")
    logits = torch.randn(9, 37)
    for row, col, value in ((0, 0, float("nan")), (8, 36, float("-nan")), (4, 33, float("inf")), (5, None, None)):
        bad = logits.clone()
        if col is None:
            bad[row] = float("-inf")
        else:
            bad[row, col] = value
        with pytest.raises(ValueError, match="no finite probability"):
            tt._compiled_draws(bad, 4, tt.counter_uniforms(0, 0, 9, 4), 1.0)
    ok = logits.clone()
    ok[3, :36] = float("-inf")  # one finite logit left in the row, at the tail the 8-wide loops do not cover
    ids, counts = tt._compiled_draws(ok, 4, tt.counter_uniforms(0, 0, 9, 4), 1.0)
    assert ids[3, 0] == 36 and counts[3, 0] == 4


def test_the_compiled_sampler_gives_the_same_draws_on_one_thread_and_on_several(monkeypatch):
    """Rows split over threads (torch's OpenMP ones, or the pool without OpenMP) draw what one thread draws, and a bad
    row in any thread's share is refused."""
    if tt._sample_rows is None:
        pytest.skip("teacher/_sampler.c was not built here")
    logits = torch.randn(900, 4099, generator=torch.Generator().manual_seed(1)) * 3
    u = tt.counter_uniforms(5, 11, 900, 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    several = tt._compiled_draws(logits, 16, u, 0.7)  # 900 x 4,099 logits (> 3 x 2^20): 3 threads of 300 rows
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = tt._compiled_draws(logits, 16, u, 0.7)
    assert all(torch.equal(a, b) for a, b in zip(several, one))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    for row in (0, 450, 899):
        bad = logits.clone()
        bad[row, 7] = float("nan")
        with pytest.raises(ValueError, match="no finite probability"):
            tt._compiled_draws(bad, 16, u, 0.7)


def test_packed_code_streams_are_the_numpy_ones_byte_for_byte():
    """store/_bits.c's pack_codes against the numpy definition (sparse_codec._stream without it), on the streams
    the codec makes and on edge cases: no values, zero widths, long unary runs, the widest values."""
    from pkd_cache.store import sparse_codec as sc

    if sc._pack_codes is None:
        pytest.skip("store/_bits.c was not built here")
    rng = np.random.default_rng(0)
    cases = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)),
             (np.array([0, 0, 0]), np.array([0, 1]), np.array([0, 1])),
             (np.array([200, 0, 49, 48, 47]), np.array([2 ** 62 - 1, 5, 2 ** 49 + 3]), np.array([62, 3, 50]))]
    for _ in range(200):
        n = int(rng.integers(0, 300))
        widths = rng.integers(0, 63, n)
        values = rng.integers(0, 2 ** 62, n) & ((1 << widths) - 1)
        cases.append((rng.geometric(0.3, int(rng.integers(0, 300))) - 1, values, widths))
    for unary, values, widths in cases:
        numpy = np.packbits(np.concatenate([sc._unary_bits(np.asarray(unary)), sc._to_bits(values, widths)]))
        assert np.array_equal(sc._stream(unary, values, widths), numpy), (unary, values, widths)
    for bad in ((np.array([-1]), np.zeros(0), np.zeros(0)), (np.zeros(0), np.array([1]), np.array([63])),
                (np.zeros(0), np.array([1, 2]), np.array([1]))):
        with pytest.raises(ValueError):
            sc._stream(*bad)


def test_coded_targets_are_the_same_bytes_with_and_without_the_compiled_packer(monkeypatch):
    from pkd_cache.store import sparse_codec as sc

    if sc._pack_codes is None:
        pytest.skip("store/_bits.c was not built here")
    logits = 3 * torch.randn(500, 300, generator=torch.Generator().manual_seed(1))
    ids, counts = tt.seeded_sample_targets(logits, 64, 0, 0)
    top = torch.topk(logits.log_softmax(-1), 12)
    order = top.indices.argsort(-1)
    topk = (top.indices.gather(-1, order).numpy(), top.values.gather(-1, order).numpy())
    fast = sc.encode_sampled(ids.numpy(), counts.numpy(), 64, 300), sc.encode_topk(*topk, 300)
    monkeypatch.setattr(sc, "_pack_codes", None)
    slow = sc.encode_sampled(ids.numpy(), counts.numpy(), 64, 300), sc.encode_topk(*topk, 300)
    for a, b in zip(fast, slow):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)



def test_compiled_rows_decode_edge_cases_as_numpy_does(monkeypatch):
    """rice_rows / gamma_rows against the numpy decoder on chunks at the edges: no tokens, a vocabulary of one,
    every id of the vocabulary drawn, n = 1, gaps far above the Rice parameter (long unary runs)."""
    from pkd_cache.store import sparse_codec as sc

    if sc._rice_rows is None:
        pytest.skip("store/_bits.c was not built here")
    cases = [(np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64), 4, 10),
             (np.zeros((3, 1), np.int64), np.full((3, 1), 5), 5, 1),  # V = 1
             (np.tile(np.arange(6), (2, 1)), np.ones((2, 6), np.int64), 6, 6),  # every id, each once
             (np.array([[0, 0], [7, 0]]), np.array([[1, 0], [1, 0]]), 1, 8),  # n = 1
             (np.array([[0, 99_999]]), np.array([[3, 2]]), 5, 100_000)]  # a gap of 99,998 with k = 15
    for ids, counts, n, vocab in cases:
        arrays = sc.encode_sampled(ids, counts, n, vocab)
        fast = sc.decode_sampled(arrays, n, vocab)
        assert sc._compiled_rows(sc._rice_rows, arrays["ids"], arrays["n_unique"].astype(np.int64), vocab) is not None
        with monkeypatch.context() as patch:
            patch.setattr(sc, "_rice_rows", None)
            slow = sc.decode_sampled(arrays, n, vocab)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow)), (ids, counts)
        assert all(a.flags.writeable for a in fast)


@pytest.mark.parametrize("kind", ["sample", "topk"])
def test_decoding_is_the_same_with_and_without_the_compiled_reader(monkeypatch, kind):
    """Every chunk decodes to the same targets, and every damaged one fails with the same message, through
    rice_rows / gamma_rows as through the numpy bit planes: truncated or lengthened streams, each bit of each stream's last
    byte flipped, and random bit flips."""
    from pkd_cache.store import sparse_codec as sc

    if sc._rice_rows is None:
        pytest.skip("store/_bits.c was not built here")
    logits = 3 * torch.randn(300, 500, generator=torch.Generator().manual_seed(2))
    if kind == "sample":
        ids, counts = tt.seeded_sample_targets(logits, 64, 0, 0)
        arrays = sc.encode_sampled(ids.numpy(), counts.numpy(), 64, 500)
        decode = lambda a: sc.decode_sampled(a, 64, 500)  # noqa: E731
    else:
        top = torch.topk(logits.log_softmax(-1), 12)
        order = top.indices.argsort(-1)
        arrays = sc.encode_topk(top.indices.gather(-1, order).numpy(), top.values.gather(-1, order).numpy(), 500)
        decode = lambda a: sc.decode_topk(a, 12, 500)  # noqa: E731
    rng = np.random.default_rng(3)
    damaged = [arrays]
    for name in [n for n in ("ids", "counts") if n in arrays]:
        a = arrays[name]
        damaged += [{**arrays, name: a[:-1]}, {**arrays, name: np.append(a, np.uint8(0))}]
        for bit in range(8):
            flipped = a.copy()
            flipped[-1] ^= np.uint8(1 << bit)
            damaged.append({**arrays, name: flipped})
        for _ in range(30):
            flipped = a.copy()
            flipped[rng.integers(a.size)] ^= np.uint8(1 << int(rng.integers(8)))
            damaged.append({**arrays, name: flipped})

    def outcome(a):
        try:
            return [x.tobytes() for x in decode(a)]
        except ValueError as e:
            return str(e)

    fast = [outcome(a) for a in damaged]
    monkeypatch.setattr(sc, "_rice_rows", None)
    monkeypatch.setattr(sc, "_gamma_rows", None)
    slow = [outcome(a) for a in damaged]
    assert fast == slow
    assert isinstance(fast[0], list) and sum(isinstance(f, str) for f in fast) > 10  # some decode, many fail
