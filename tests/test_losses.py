"""The PKD loss against values computed by hand."""
import math

import pytest
import torch

from pkd_cache.student.losses import LossWeights, hard_loss, patient_loss, pkd_loss, soft_loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_hard_loss_is_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    labels = torch.tensor([0, 0])
    p0, p1 = _softmax([2.0, 0.0])[0], _softmax([0.5, 1.5])[0]
    expected = -(math.log(p0) + math.log(p1)) / 2
    assert hard_loss(logits, labels, regression=False).item() == pytest.approx(expected, rel=1e-6)


def test_soft_loss_is_t2_kl_by_hand():
    s, t, temp = [1.0, -1.0, 0.5], [3.0, 0.0, -2.0], 4.0
    ps = _softmax([x / temp for x in s])
    pt = _softmax([x / temp for x in t])
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    got = soft_loss(torch.tensor([s]), torch.tensor([t]), temp, regression=False).item()
    assert got == pytest.approx(temp * temp * kl, rel=1e-5)


def test_soft_loss_zero_when_student_equals_teacher():
    z = torch.randn(5, 3)
    assert soft_loss(z, z.clone(), 10.0, regression=False).item() == pytest.approx(0.0, abs=1e-6)


def test_patient_loss_sums_over_hidden_and_averages_layers_and_batch():
    # one example, two mapped layers, H = 2
    s = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # normalised: (0.6, 0.8), (1, 0)
    t = torch.tensor([[[0.0, 2.0], [0.0, -5.0]]])  # normalised: (0, 1), (0, -1)
    layer1 = (0.6 - 0.0) ** 2 + (0.8 - 1.0) ** 2  # 0.40
    layer2 = (1.0 - 0.0) ** 2 + (0.0 + 1.0) ** 2  # 2.0
    assert patient_loss(s, t).item() == pytest.approx((layer1 + layer2) / 2, rel=1e-6)


def test_patient_loss_is_scale_invariant_and_h_times_the_mean_convention():
    s, t = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    assert patient_loss(7.0 * s, 0.1 * t).item() == pytest.approx(patient_loss(s, t).item(), rel=1e-5)
    sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    mean_convention = torch.nn.functional.mse_loss(sn, tn).item()  # what the original PKD code computed
    assert patient_loss(s, t).item() == pytest.approx(16 * mean_convention, rel=1e-5)


def test_total_loss_combines_parts_with_alpha_beta():
    torch.manual_seed(0)
    logits, t_logits = torch.randn(6, 2), torch.randn(6, 2)
    s_cls, t_cls = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    labels = torch.randint(0, 2, (6,))
    batch = {"labels": labels, "logits": t_logits, "cls": t_cls}
    w = LossWeights(alpha=0.3, beta=2.0, temperature=5.0)
    total, parts = pkd_loss(logits, s_cls, batch, w, regression=False)
    expected = 0.7 * hard_loss(logits, labels, False) + 0.3 * soft_loss(logits, t_logits, 5.0, False) \
        + 2.0 * patient_loss(s_cls, t_cls)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"loss", "loss_ce", "loss_kd", "loss_pt"}


def test_alpha_beta_zero_is_plain_fine_tuning():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    batch = {"labels": labels, "logits": torch.randn(4, 3), "cls": torch.randn(4, 1, 8)}
    total, parts = pkd_loss(logits, torch.randn(4, 1, 8), batch, LossWeights(0.0, 0.0, 10.0), regression=False)
    assert total.item() == pytest.approx(hard_loss(logits, labels, False).item(), rel=1e-7)
    assert "loss_kd" not in parts and "loss_pt" not in parts


def test_regression_uses_mse_on_teacher_score():
    s = torch.tensor([[0.5], [2.0]])
    t = torch.tensor([[1.0], [1.0]])
    y = torch.tensor([0.0, 3.0])
    assert soft_loss(s, t, 10.0, regression=True).item() == pytest.approx((0.25 + 1.0) / 2)
    assert hard_loss(s, y, regression=True).item() == pytest.approx((0.25 + 1.0) / 2)


def test_gradients_flow_to_student_only_inputs():
    logits = torch.randn(3, 2, requires_grad=True)
    s_cls = torch.randn(3, 1, 4, requires_grad=True)
    batch = {"labels": torch.tensor([0, 1, 0]), "logits": torch.randn(3, 2), "cls": torch.randn(3, 1, 4)}
    total, _ = pkd_loss(logits, s_cls, batch, LossWeights(0.5, 1.0, 2.0), regression=False)
    total.backward()
    assert logits.grad is not None and s_cls.grad is not None and s_cls.grad.abs().sum() > 0
