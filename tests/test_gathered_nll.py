"""gathered_nll: the values and gradients of -log_softmax(z).gather(ids), without the [T, V] log-probs."""
import pytest
import torch
import torch.nn.functional as F

from pkd_cache.student.gathered_nll import gathered_nll


def reference(z, ids):
    return -F.log_softmax(z, dim=-1).gather(-1, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_match_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(7, 11, generator=g, dtype=dtype) * 4).requires_grad_()
    ids = torch.randint(0, 11, (7, 5), generator=g)
    ids[:, 1] = ids[:, 0]  # a repeated id in every row: their gradients add up
    w = torch.rand(7, 5, generator=g, dtype=dtype)
    ours = gathered_nll(z, ids)
    (grad_ours,) = torch.autograd.grad((w * ours).sum(), z)
    theirs = reference(z, ids)
    (grad_theirs,) = torch.autograd.grad((w * theirs).sum(), z)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ours, theirs, atol=tol) and torch.allclose(grad_ours, grad_theirs, atol=tol)


def test_finite_differences_and_large_logits():
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 5, 5], [1, 2, 3], [4, 4, 4], [0, 1, 2]])
    w = torch.rand(4, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * gathered_nll(z, ids)).sum(), z)
    eps, numeric = 1e-6, torch.zeros_like(z)
    for i in range(z.numel()):
        d = torch.zeros(z.numel(), dtype=torch.float64)
        d[i] = eps
        d = d.view_as(z)
        numeric.view(-1)[i] = ((w * reference(z + d, ids)).sum() - (w * reference(z - d, ids)).sum()) / (2 * eps)
    assert torch.allclose(grad, numeric, atol=1e-8)
    big = torch.tensor([[1000.0, 0.0, -1000.0]])  # a naive exp overflows: the logsumexp does not
    assert torch.allclose(gathered_nll(big, torch.tensor([[0, 1]])), torch.tensor([[0.0, 1000.0]]))


def test_a_second_backward_is_refused_not_wrong():
    z = torch.randn(3, 5, requires_grad=True)
    loss = gathered_nll(z, torch.tensor([[1], [2], [3]])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[T, V\]"):
        gathered_nll(torch.zeros(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))
