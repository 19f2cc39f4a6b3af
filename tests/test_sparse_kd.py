"""Sparse token-level KD (pkd_cache/student/sparse_kd.py): RS-KD's unbiasedness, top-k's bias, the rest bucket.

A tiny vocabulary (V = 50, 8 tokens), a random student and a peaked teacher (logits 2.5 · N(0, 1)), fixed seeds.

The tolerance of the unbiasedness checks comes from the sampling variance. The gradient of the mean loss w.r.t.
z_i is (T_kd / n_tokens) · (s_i - q̂_i), q̂_i = c_i / N; averaged over R independent draws, q̄_i is the frequency of
id i among N·R i.i.d. draws, with variance p_i (1 - p_i) / (N R) (the standard error SE_i below). A plain
"5 SE" bound is wrong for rare ids (p_i N R < 1: the count is Poisson-like, one lucky draw is a 5.7-SE event;
seen at sample:4), so each element must lie within Bernstein's bound at δ = 1e-6,
    ε_i = (T_kd / n_tokens) · (L / (3 N R) + sqrt((L / (3 N R))² + 2 p_i (1 - p_i) L / (N R))),  L = ln(2 / δ),
≈ 5.4 SE for common ids, plus a term for rare ones; a false failure somewhere among the 400 elements has
probability < 4e-4.
"""
from __future__ import annotations

import math

import pytest
import torch

from pkd_cache.student.sparse_kd import FullKDLoss, SampledKDLoss, TopKKDLoss, sample_targets, topk_targets

T_TOK, V, R = 8, 50, 4000


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(T_TOK, V, generator=g, dtype=torch.float64)
    teacher = 2.5 * torch.randn(T_TOK, V, generator=g, dtype=torch.float64)
    return student, teacher


def _grad(loss_fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    loss = loss_fn(z)
    loss.backward()
    return loss.detach(), z.grad


def _tolerance(p: torch.Tensor, n: int, temp: float, delta: float = 1e-6) -> torch.Tensor:
    """Bernstein's bound (module docstring) on |mean over R draws of sample:n's gradient - full KD's|, per element."""
    log_term, draws = math.log(2 / delta), n * R
    a = log_term / (3 * draws)
    return (temp / T_TOK) * (a + (a * a + 2 * p * (1 - p) * log_term / draws).sqrt())


def _sampled_grads(student, teacher, n, temp, seed=1):
    """R independent sample:n targets for the same tokens; the loss and gradient of each (one batched call)."""
    g = torch.Generator().manual_seed(seed)
    ids, counts = sample_targets(teacher.repeat(R, 1), n, g, temperature=temp)  # draw r = rows r*T .. r*T+T-1
    z = student.repeat(R, 1).requires_grad_(True)
    per_token = SampledKDLoss(temp, reduction="none")(z, ids, counts)  # [R*T]
    per_draw = per_token.view(R, T_TOK).mean(-1)  # each draw's mean loss
    per_draw.sum().backward()  # the copies of the student are separate leaves: row block r gets draw r's gradient
    return per_draw.detach(), z.grad.view(R, T_TOK, V)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("n", [4, 16])
def test_sampled_kd_gradient_and_value_are_unbiased(n, temp):
    student, teacher = _logits()
    full_loss, full_grad = _grad(lambda z: FullKDLoss(temp)(z, teacher), student)
    losses, grads = _sampled_grads(student, teacher, n, temp)
    mean_grad = grads.mean(0)
    p = torch.softmax(teacher / temp, -1)
    err = (mean_grad - full_grad).abs()
    ratio = err / _tolerance(p, n, temp)
    assert ratio.max() < 1, f"sample:{n} T={temp}: max |error| / tolerance = {ratio.max():.2f}"
    se = (temp / T_TOK) * (p * (1 - p) / (n * R)).sqrt()
    # the empirical SE agrees with the derived one (the derivation, not only the bound, is right)
    emp_se = grads.std(0) / R ** 0.5
    assert torch.allclose(emp_se.sum(), se.sum(), rtol=0.05)
    # values: E[H(q̂, s)] = H(p, s)
    loss_se = losses.std() / R ** 0.5
    assert abs(losses.mean() - full_loss) < 5 * loss_se
    rel = (mean_grad - full_grad).norm() / full_grad.norm()
    print(f"\nsample:{n} T={temp}: grad rel err {rel:.4f}, max |err| {err.max():.2e} = {ratio.max():.2f} x tolerance, "
          f"loss {losses.mean():.4f} vs full {full_loss:.4f} (SE {loss_se:.4f})")


def test_topk_gradient_is_biased_but_exact_at_k_equal_v():
    student, teacher = _logits()
    full_loss, full_grad = _grad(lambda z: FullKDLoss()(z, teacher), student)
    ids, lp = topk_targets(teacher, 4)
    _, topk_grad = _grad(lambda z: TopKKDLoss()(z, ids, lp), student)
    tol16 = _tolerance(torch.softmax(teacher, -1), 16, 1.0)  # what sample:16 (averaged over R draws) met
    bias = (topk_grad - full_grad).abs()
    rel = (topk_grad - full_grad).norm() / full_grad.norm()
    print(f"\ntopk:4 bias: max {bias.max():.2e} = {(bias / tol16).max():.0f} x the sample:16 tolerance, above it in "
          f"{(bias > tol16).sum()} of {bias.numel()} elements, rel {rel:.3f}")
    assert (bias / tol16).max() > 50 and (bias > tol16).float().mean() > 0.5 and rel > 0.1
    # K = V: no rest bucket, exactly full KD (value and gradient), in both objectives and at another temperature
    for temp in (1.0, 3.0):
        for objective in ("ce", "kl"):
            ids_v, lp_v = topk_targets(teacher, V, temperature=temp)
            a_loss, a_grad = _grad(lambda z: TopKKDLoss(temp, objective)(z, ids_v, lp_v), student)
            b_loss, b_grad = _grad(lambda z: FullKDLoss(temp, objective)(z, teacher), student)
            assert torch.isfinite(a_grad).all()
            assert abs(a_loss - b_loss) < 1e-6 and (a_grad - b_grad).abs().max() < 1e-6


def _renormalised_topk(z, ids, lp):
    """The naive alternative: renormalise the top K to sum to 1, no rest bucket."""
    q = (lp - lp.logsumexp(-1, keepdim=True)).exp()
    return -(q * z.log_softmax(-1).gather(-1, ids)).sum(-1).mean()


def test_rest_bucket_keeps_top_k_mass_where_renormalising_makes_it_overconfident():
    student, teacher = _logits()
    student, teacher = student.float(), teacher.float()
    ids, lp = topk_targets(teacher, 4)
    teacher_mass = lp.exp().sum(-1)

    def fit(loss_fn):
        z = student.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(300):
            opt.zero_grad()
            loss_fn(z).backward()
            opt.step()
        return z.detach().softmax(-1).gather(-1, ids).sum(-1)

    bucket = fit(lambda z: TopKKDLoss()(z, ids, lp))
    renorm = fit(lambda z: _renormalised_topk(z, ids, lp))
    print(f"\ntop-4 mass: teacher {teacher_mass.mean():.3f} (min {teacher_mass.min():.3f}), "
          f"bucket {bucket.mean():.3f} (max |diff| {(bucket - teacher_mass).abs().max():.4f}), "
          f"renormalised {renorm.mean():.3f} (min {renorm.min():.3f})")
    assert (bucket - teacher_mass).abs().max() < 0.01
    assert renorm.min() > 0.98 and (renorm - teacher_mass).min() > 0.01


def test_padding_slots_and_masked_tokens_contribute_nothing():
    student, teacher = _logits()
    ids, counts = sample_targets(teacher, 16, torch.Generator().manual_seed(3))
    loss = SampledKDLoss(2.0)
    ref = loss(student, ids, counts)
    # extra padding slots with any id, even out of range, and count 0
    pad_ids = torch.tensor([[0, V - 1, -1, V + 7]]).expand(T_TOK, 4)
    pad_counts = torch.zeros(T_TOK, 4, dtype=counts.dtype)
    padded = loss(student, torch.cat([ids, pad_ids], 1), torch.cat([counts, pad_counts], 1))
    assert torch.allclose(padded, ref, atol=1e-12)
    # a padding slot at an id the student rules out (logit -inf) still adds nothing: no 0 · (-inf) = NaN
    z_inf, t_no = student.clone(), teacher.clone()
    z_inf[:, V - 1] = t_no[:, V - 1] = float("-inf")
    ids2, counts2 = sample_targets(t_no, 16, torch.Generator().manual_seed(4))
    zz = z_inf.clone().requires_grad_(True)
    got = loss(zz, torch.cat([ids2, torch.full((T_TOK, 1), V - 1)], 1), torch.cat([counts2, torch.zeros(T_TOK, 1)], 1))
    got.backward()
    assert torch.allclose(got, loss(z_inf, ids2, counts2), atol=1e-12) and torch.isfinite(zz.grad).all()
    # counts as floats give the same loss
    assert torch.allclose(loss(student, ids, counts.double()), ref, atol=1e-12)
    # masked tokens: garbage in them (NaN logits, nonsense targets) changes nothing and gets a zero gradient
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    z = student.clone()
    z[~mask] = float("nan")
    bad_ids, bad_counts = ids.clone(), counts.clone()
    bad_ids[~mask] = 10 ** 6
    ids_lp, lp = topk_targets(teacher, 5)
    cases = [
        (loss, (ids, counts), (bad_ids, bad_counts)),
        (TopKKDLoss(2.0), (ids_lp, lp), (ids_lp.masked_fill(~mask[:, None], 10 ** 6), lp)),
        (FullKDLoss(2.0), (teacher,), (teacher.masked_fill(~mask[:, None], float("nan")),)),
    ]
    for fn, good, bad in cases:
        expected = fn(student[mask], *[x[mask] for x in good])
        zz = z.clone().requires_grad_(True)
        got = fn(zz, *bad, mask=mask)
        got.backward()
        assert torch.allclose(got, expected, atol=1e-12), type(fn).__name__
        assert (zz.grad[~mask] == 0).all() and torch.isfinite(zz.grad).all()
        # 'sum' and 'none' agree with 'mean'
        fn.reduction = "none"
        per_token = fn(zz.detach(), *bad, mask=mask)
        fn.reduction = "mean"
        assert per_token.shape == (T_TOK,) and (per_token[~mask] == 0).all()
        assert torch.allclose(per_token.sum() / mask.sum(), expected, atol=1e-12)
    # no real token at all: 0, and a graph to backprop through
    zz = student.clone().requires_grad_(True)
    out = loss(zz, ids, counts, mask=torch.zeros(T_TOK, dtype=torch.bool))
    out.backward()
    assert out.item() == 0 and (zz.grad == 0).all()
    # a token whose counts are all 0 counts as masked
    empty = counts.clone()
    empty[1] = 0
    assert torch.allclose(loss(student, ids, empty), loss(student[[0, *range(2, T_TOK)]], ids[[0, *range(2, T_TOK)]],
                                                            counts[[0, *range(2, T_TOK)]]), atol=1e-12)


def test_shapes_are_checked_and_batched_inputs_flatten():
    student, teacher = _logits()
    ids, counts = sample_targets(teacher, 8, torch.Generator().manual_seed(0))
    ids_k, lp = topk_targets(teacher, 4)
    assert SampledKDLoss()(student, ids, counts).shape == ()
    assert TopKKDLoss()(student, ids_k, lp).shape == ()
    assert FullKDLoss()(student, teacher).shape == ()
    # [B, S, V] is [B*S, V]
    b = lambda x: x.view(2, T_TOK // 2, *x.shape[1:])  # noqa: E731
    assert torch.allclose(SampledKDLoss()(b(student), b(ids), b(counts)), SampledKDLoss()(student, ids, counts))
    assert torch.allclose(TopKKDLoss()(b(student), b(ids_k), b(lp)), TopKKDLoss()(student, ids_k, lp))
    with pytest.raises(ValueError):
        SampledKDLoss()(student, ids, counts[:, :-1])
    with pytest.raises(ValueError):
        SampledKDLoss()(student, ids[:-1], counts[:-1])
    with pytest.raises(ValueError):
        TopKKDLoss()(student, ids_k, lp[:, :2])
    with pytest.raises(ValueError):
        TopKKDLoss()(student, ids_k, lp, mask=torch.ones(T_TOK + 1, dtype=torch.bool))
    with pytest.raises(ValueError):
        FullKDLoss()(student, teacher[:, :-1])
    with pytest.raises(ValueError):
        SampledKDLoss(objective="kl")(student, ids, counts)  # needs the teacher's entropy
    with pytest.raises(ValueError):
        TopKKDLoss(temperature=0.0)
    with pytest.raises(ValueError):
        topk_targets(teacher, V + 1)


def test_kl_objectives_shift_the_value_not_the_gradient():
    student, teacher = _logits()
    p = torch.softmax(teacher / 2, -1)
    entropy = -(p * p.log()).sum(-1)
    ce, kl = FullKDLoss(2.0)(student, teacher), FullKDLoss(2.0, "kl")(student, teacher)
    assert torch.allclose(ce - kl, 4 * entropy.mean())  # T² · H(p)
    assert FullKDLoss(2.0, "kl")(teacher, teacher).abs() < 1e-12
    ids, counts = sample_targets(teacher, 16, torch.Generator().manual_seed(0), temperature=2.0)
    sampled_ce = SampledKDLoss(2.0)(student, ids, counts)
    sampled_kl = SampledKDLoss(2.0, "kl")(student, ids, counts, teacher_entropy=entropy)
    assert torch.allclose(sampled_ce - sampled_kl, 4 * entropy.mean())
    ids_k, lp = topk_targets(teacher, 4, temperature=2.0)
    for make in (lambda o: (lambda z: TopKKDLoss(2.0, o)(z, ids_k, lp)),
                 lambda o: (lambda z: FullKDLoss(2.0, o)(z, teacher))):
        (_, g_ce), (kl_val, g_kl) = _grad(make("ce"), student), _grad(make("kl"), student)
        assert torch.allclose(g_ce, g_kl) and kl_val >= 0
    # the coarsened KL never exceeds the full KL (data processing inequality)
    assert TopKKDLoss(2.0, "kl")(student, ids_k, lp) <= FullKDLoss(2.0, "kl")(student, teacher)


def test_gradcheck_sparse_losses():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    ids, counts = sample_targets(teacher, 5, g)
    ids_k, lp = topk_targets(teacher, 2)
    mask = torch.tensor([True, False, True])
    # gathered_nll's backward runs once (gradcheck runs each twice): against the loss written in plain autograd
    (grad,) = torch.autograd.grad(SampledKDLoss(1.5)(z, ids, counts, mask), z)
    q = counts[mask] / counts[mask].sum(-1, keepdim=True)
    by_hand = -1.5 ** 2 * (q * torch.log_softmax(z[mask] / 1.5, -1).gather(-1, ids[mask])).sum() / mask.sum()
    assert torch.allclose(grad, torch.autograd.grad(by_hand, z)[0], atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: TopKKDLoss(1.5)(x, ids_k, lp, mask), (z,))
    assert torch.autograd.gradcheck(lambda x: TopKKDLoss(1.5, "kl")(x, ids_k, lp), (z,))
    assert torch.autograd.gradcheck(lambda x: FullKDLoss(1.5)(x, teacher, mask), (z,))


def test_sample_targets_counts_ids_and_determinism():
    _, teacher = _logits()
    for n in (1, 4, 16, 64):
        ids, counts = sample_targets(teacher, n, torch.Generator().manual_seed(7))
        assert ids.shape == counts.shape and ids.shape[0] == T_TOK and ids.dtype == torch.long
        assert (counts.sum(-1) == n).all()
        assert counts.shape[1] == (counts > 0).sum(-1).max()  # M = the most unique ids in a row
        for row_ids, row_counts in zip(ids, counts):
            real = row_ids[row_counts > 0]
            assert real.unique().numel() == real.numel() and ((0 <= real) & (real < V)).all()
            assert (row_ids[row_counts == 0] == 0).all()
            assert (row_counts[: real.numel()] > 0).all()  # padding only at the end
        again = sample_targets(teacher, n, torch.Generator().manual_seed(7))
        assert torch.equal(again[0], ids) and torch.equal(again[1], counts)
    other = sample_targets(teacher, 64, torch.Generator().manual_seed(8))
    assert not (other[0].shape == ids.shape and torch.equal(other[0], ids) and torch.equal(other[1], counts))
    # frequencies follow the teacher at the requested temperature
    ids, counts = sample_targets(teacher[:1].expand(20000, V), 1, torch.Generator().manual_seed(0), temperature=2.0)
    freq = torch.bincount(ids[:, 0], weights=counts[:, 0].double(), minlength=V) / 20000
    p = torch.softmax(teacher[0] / 2, -1)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 20000).sqrt() + 1e-9).all()
    assert [x.shape for x in sample_targets(teacher[:0], 4)] == [(0, 0), (0, 0)]
