"""Counter-based sample:N targets (pkd_cache/teacher/token_targets.py): the documented hash, independence of how the
rows are batched, the distribution of the draws (zero-probability ids never drawn), temperature, and
sample_targets' output convention and on-disk coding.

Frequency bounds: over R rows of the same logits with n draws each, the count of id i is Binomial(N = R n, p_i)
when the uniforms behave as i.i.d. U[0, 1) (what the hash must give). Bernstein's inequality bounds
|count / N - p_i| by  L / (3 N) + sqrt((L / (3 N))² + 2 p_i (1 - p_i) L / N),  L = ln(2 / δ),  with probability
>= 1 - δ (δ = 1e-6); a plain "k standard errors" bound is wrong for the rare id (p_i N ≈ 40: a Poisson-like count).
With 6 ids per case, a false failure has probability < 1e-5 per case; the seeds are fixed anyway.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pkd_cache.store import sparse_codec as sc
from pkd_cache.student.sparse_kd import sample_targets
from pkd_cache.teacher import token_targets as tt
from pkd_cache.teacher.token_targets import counter_uniforms, seeded_sample_targets

M64 = (1 << 64) - 1
# 8 ids: 0 and 7 have probability exactly 0 (-inf logits, at both ends of the CDF), id 6 is tiny
P8 = np.array([0.0, 0.4, 0.25, 0.15, 0.1, 0.0999, 1e-4, 0.0])


@pytest.fixture(params=["default", "torch"])
def sampler(request, monkeypatch):
    """A test that takes this runs on the default sampler (teacher/_sampler.c where it was built) and on torch's."""
    if request.param == "torch":
        monkeypatch.setattr(tt, "_sample_rows", None)
    return request.param


def _ref_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_uniform(seed: int, t: int, j: int) -> float:
    """counter_uniforms' docstring, written out again on Python ints."""
    w = lambda x: _ref_mix((x + 0x9E3779B97F4A7C15) & M64)  # noqa: E731
    h = _ref_mix(_ref_mix(w(seed & M64)) ^ w(t))
    return (_ref_mix(h ^ w(j)) >> 11) / 2 ** 53


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _bernstein(p: np.ndarray, draws: int, delta: float = 1e-6) -> np.ndarray:
    log_term = math.log(2 / delta)
    a = log_term / (3 * draws)
    return a + np.sqrt(a * a + 2 * p * (1 - p) * log_term / draws)


def _frequencies(ids: torch.Tensor, counts: torch.Tensor, vocab: int) -> np.ndarray:
    c = np.bincount(ids.reshape(-1).numpy(), weights=counts.reshape(-1).numpy(), minlength=vocab)
    return c / c.sum()


def _check_layout(ids: torch.Tensor, counts: torch.Tensor, n: int, vocab: int) -> None:
    """sample_targets' convention: int64 [T, M], M = the most unique ids of a row, each row's ids strictly
    ascending with counts >= 1, then padding (id 0, count 0), counts summing to n."""
    assert ids.dtype == counts.dtype == torch.int64 and ids.shape == counts.shape and ids.dim() == 2
    real = counts > 0
    m = real.sum(-1)
    assert ids.shape[1] == int(m.max())
    assert bool((real == (torch.arange(ids.shape[1]) < m[:, None])).all())  # real slots first, then padding
    assert bool((ids[~real] == 0).all()) and bool((counts[~real] == 0).all())
    assert bool(((ids[:, 1:] > ids[:, :-1]) | ~real[:, 1:]).all())
    assert bool((counts.sum(-1) == n).all()) and int(ids.min()) >= 0 and int(ids.max()) < vocab


def test_counter_uniforms_are_the_documented_function():
    cases = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (12345, 987_654_321, 63), (-1, 5, 2),
             (2 ** 64 - 1, 2 ** 40 + 3, 1000), (2 ** 63, 2 ** 64 - 1, 7)]
    for seed, t, j in cases:
        assert counter_uniforms(seed, t, 1, j + 1)[0, j] == _ref_uniform(seed, t, j), (seed, t, j)
    assert counter_uniforms(-1, 7, 1, 3).tolist() == counter_uniforms(2 ** 64 - 1, 7, 1, 3).tolist()  # mod 2^64
    u = counter_uniforms(5, 1000, 40, 9)
    assert u.shape == (40, 9) and u.dtype == np.float64
    ref = np.array([[_ref_uniform(5, 1000 + i, j) for j in range(9)] for i in range(40)])
    np.testing.assert_array_equal(u, ref)
    np.testing.assert_array_equal(counter_uniforms(5, 1000, 40, 4), u[:, :4])  # no dependence on n
    np.testing.assert_array_equal(counter_uniforms(5, 1017, 10, 9), u[17:27])  # nor on the split
    assert counter_uniforms(0, 0, 0, 5).shape == (0, 5) and counter_uniforms(0, 0, 3, 0).shape == (3, 0)


def test_counter_uniforms_look_uniform_and_do_not_collide():
    from scipy import stats
    grids = {seed: counter_uniforms(seed, 0, 2000, 32) for seed in (0, 1, 2, 7)}
    every = np.concatenate([g.reshape(-1) for g in grids.values()])
    assert every.min() >= 0 and every.max() < 1
    assert np.unique(every).size == every.size  # 256k 53-bit values: a repeat has probability ~4e-6
    for g in grids.values():
        assert stats.kstest(g.reshape(-1), "uniform").pvalue > 1e-6
        assert abs(np.corrcoef(g[:, 0], g[:, 1])[0, 1]) < 0.12  # draws 0 and 1 of the same tokens: SE 0.022
        assert abs(np.corrcoef(g[:-1, 0], g[1:, 0])[0, 1]) < 0.12  # neighbouring tokens
    # no symmetry between the inputs: (seed a, token b) is not (seed b, token a), nor token t draw j (token j, draw t)
    for a, b in [(3, 7), (0, 1), (1, 2)]:
        assert counter_uniforms(a, b, 1, 4).tolist() != counter_uniforms(b, a, 1, 4).tolist()
    u = counter_uniforms(0, 0, 16, 16)
    assert not np.array_equal(u, u.T)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_splitting_the_rows_gives_the_same_targets(temperature, monkeypatch, sampler):
    logits, n, first = _logits(100, 500), 32, 10 ** 9
    whole = seeded_sample_targets(logits, n, seed=11, first_token=first, temperature=temperature)
    parts = [seeded_sample_targets(logits[a:b], n, seed=11, first_token=first + a, temperature=temperature)
             for a, b in [(0, 37), (37, 99), (99, 100)]]
    for k, part in enumerate(parts):  # each part pads to its own M: compare row by row at the part's width
        a, b = [(0, 37), (37, 99), (99, 100)][k]
        width = part[0].shape[1]
        assert torch.equal(whole[0][a:b, :width], part[0]) and torch.equal(whole[1][a:b, :width], part[1])
        assert not bool(whole[1][a:b, width:].any())
    monkeypatch.setattr(tt, "_CHUNK_CPU", 3 * 500)  # blocks of 3 rows inside the call: the same targets again
    blocked = seeded_sample_targets(logits, n, seed=11, first_token=first, temperature=temperature)
    assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])


def test_seed_and_token_index_choose_the_draws(sampler):
    logits, n = _logits(100, 500, seed=1), 16
    a = seeded_sample_targets(logits, n, seed=3, first_token=0)
    b = seeded_sample_targets(logits, n, seed=3, first_token=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (seeded_sample_targets(logits, n, seed=4, first_token=0),
                  seeded_sample_targets(logits, n, seed=3, first_token=1)):
        rows_equal = sum(bool(torch.equal(a[0][r][a[1][r] > 0], other[0][r][other[1][r] > 0])) for r in range(100))
        assert rows_equal < 10  # ~500 ids of spread-out logits, 16 draws: identical draws by chance are rare


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draw_frequencies_match_the_tempered_softmax(temperature, sampler):
    rows, n = 25_000, 16
    with np.errstate(divide="ignore"):
        logits = torch.tensor(np.log(P8), dtype=torch.float32).expand(rows, 8).contiguous()
    ids, counts = seeded_sample_targets(logits, n, seed=2024, first_token=123, temperature=temperature)
    freq = _frequencies(ids, counts, 8)
    p = P8 ** (1 / temperature)
    p /= p.sum()
    assert freq[0] == 0 and freq[7] == 0  # the -inf ids, at both ends of the CDF, are never drawn
    bound = _bernstein(p, rows * n)
    assert (np.abs(freq - p) <= bound).all(), (freq, p, bound)
    assert freq[6] > 0  # the tiny id (p = 1e-4: ~40 draws expected at T = 1) is drawn
    if temperature != 1:  # the temperature is applied: the untempered p is far outside the bound
        assert (np.abs(freq - P8) > _bernstein(P8, rows * n)).any()


def test_zero_probability_ids_at_the_extreme_uniforms(sampler):
    u = torch.tensor([[0.0, 2.0 ** -53, 0.5, 1 - 2.0 ** -53]], dtype=torch.float64)
    cases = {  # p row -> the draws at u = 0, 2^-53, 1/2, 1 - 2^-53
        (0.0, 0.5, 0.5, 0.0): [1, 1, 2, 2],
        (0.0, 0.0, 1.0, 0.0, 0.0): [2, 2, 2, 2],
        (0.3, 0.7, 0.0, 0.0, 0.0): [0, 0, 1, 1],  # trailing zeros: the clamp to V - 1 is never what decides
        (0.0, 0.4999999, 0.4999999, 0.0): [1, 1, 2, 2],  # a total below 1 (float32 rounding)
        (0.0, 0.5000001, 0.5000001, 0.0): [1, 1, 2, 2],  # and above
        (1e-30, 1.0, 0.0): [0, 1, 1, 1],
    }
    for p, want in cases.items():
        for dtype in (torch.float32, torch.float64):
            got = tt._inverse_cdf(torch.tensor([p], dtype=dtype), u)
            assert got.tolist() == [want], (p, dtype, got)
    # softmax rows with most logits -inf: no -inf id is ever drawn
    g = torch.Generator().manual_seed(5)
    logits = _logits(300, 200, seed=5).masked_fill(torch.rand(300, 200, generator=g) < 0.8, float("-inf"))
    logits[:, 0] = 0.0  # every row keeps a finite logit
    logits[::7, 0], logits[::7, -1] = float("-inf"), 0.0  # some rows: id 0 impossible, id V-1 possible
    ids, counts = seeded_sample_targets(logits, 64, seed=0, first_token=0)
    drawn = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, counts > 0)
    assert not bool((drawn & torch.isinf(logits)).any())


def test_output_convention_is_sample_targets(sampler):
    logits, n = _logits(64, 300, seed=2), 24
    ours = seeded_sample_targets(logits, n, seed=1, first_token=0)
    theirs = sample_targets(logits, n, torch.Generator().manual_seed(1))
    _check_layout(*ours, n, 300)
    _check_layout(*theirs, n, 300)
    one_hot = torch.full((5, 300), float("-inf"))
    one_hot[torch.arange(5), torch.tensor([0, 3, 299, 3, 150])] = 1.0
    a, b = seeded_sample_targets(one_hot, n, 9, 0), sample_targets(one_hot, n, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a certain row: identical targets
    assert a[0].tolist() == [[0], [3], [299], [3], [150]] and a[1].flatten().tolist() == [n] * 5
    for empty in (seeded_sample_targets(logits[:0], n, 0, 0), sample_targets(logits[:0], n)):
        assert empty[0].shape == empty[1].shape == (0, 0) and empty[0].dtype == torch.int64
    half = seeded_sample_targets(logits.to(torch.bfloat16), n, seed=1, first_token=0)  # converted to float32
    _check_layout(*half, n, 300)
    assert torch.equal(seeded_sample_targets(logits, 1, 4, 0)[1], torch.ones(64, 1, dtype=torch.int64))


def test_round_trip_through_the_sparse_codec(sampler):
    vocab, n = 5000, 50
    ids, counts = seeded_sample_targets(_logits(64, vocab, seed=3), n, seed=8, first_token=4096)
    arrays = sc.encode_sampled(ids.numpy(), counts.numpy(), n, vocab)
    got_ids, got_counts = sc.decode_sampled(arrays, n, vocab)
    assert np.array_equal(got_ids, ids.numpy()) and np.array_equal(got_counts, counts.numpy())


def test_bad_arguments(sampler):
    logits = _logits(4, 10)
    bad = [dict(n=0), dict(n=-3), dict(n=2.5), dict(n=float("inf")), dict(n=float("nan")),
           dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")),
           dict(temperature=float("inf")), dict(first_token=-1)]
    for kwargs in bad:
        args = dict(teacher_logits=logits, n=4, seed=0, first_token=0) | kwargs
        with pytest.raises(ValueError):
            seeded_sample_targets(**args)
    nan_row, inf_row, dead_row = logits.clone(), logits.clone(), logits.clone()
    nan_row[2, 3], inf_row[1, 0], dead_row[3] = float("nan"), float("inf"), float("-inf")
    for x in (logits[0], logits[None], torch.zeros(4, 0), nan_row, inf_row, dead_row):
        with pytest.raises(ValueError):
            seeded_sample_targets(x, 4, 0, 0)
    for args in ((0, -1, 3, 4), (0, 0, -1, 4), (0, 0, 3, -1), (0, 2 ** 64 - 2, 3, 4)):
        with pytest.raises(ValueError):
            counter_uniforms(*args)
