"""The PKD objective (Sun et al., 2019, eq. 1-7).

    L = (1 - alpha) * L_CE + alpha * L_DS + beta * L_PT

L_CE is cross-entropy on the labels; L_DS = T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) is the soft-label
loss on the teacher's logits (its gradient equals that of the paper's soft cross-entropy; the T^2 keeps gradient
magnitudes comparable across temperatures, as in Hinton et al.). L_PT is the patient loss: the squared distance
between L2-normalised [CLS] vectors, **summed over the hidden dimension** (the paper's equation), averaged over
the mapped layers and the batch. The original PKD code averaged over the hidden dimension too, so its beta values
are H times larger than ours: paper/code beta=100 on bert-base (H=768) is beta=100/768 here.

For regression tasks (stsb) the soft loss is the MSE between student and teacher scores and the hard loss the
MSE to the label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    alpha: float
    beta: float
    temperature: float


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(student_logits.squeeze(-1).float(), teacher_logits.squeeze(-1).float())
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def patient_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """student_cls, teacher_cls: B x M x H (M mapped layers). Mean over B and M of ||ĥ_s - ĥ_t||² (sum over H)."""
    s = F.normalize(student_cls.float(), p=2, dim=-1)
    t = F.normalize(teacher_cls.float(), p=2, dim=-1)
    return (s - t).pow(2).sum(dim=-1).mean()


def pkd_loss(student_logits: torch.Tensor, student_cls: Optional[torch.Tensor], batch: dict, w: LossWeights,
             regression: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its parts (detached), from a student forward and a batch read from the store.

    `student_cls` (B x M x H) and `batch["cls"]` are only needed when beta > 0.
    """
    ce = hard_loss(student_logits, batch["labels"], regression)
    total = (1 - w.alpha) * ce
    parts = {"loss_ce": ce.detach()}
    if w.alpha > 0:
        ds = soft_loss(student_logits, batch["logits"], w.temperature, regression)
        total = total + w.alpha * ds
        parts["loss_kd"] = ds.detach()
    if w.beta > 0 and student_cls is not None and student_cls.shape[1] > 0:
        pt = patient_loss(student_cls, batch["cls"])
        total = total + w.beta * pt
        parts["loss_pt"] = pt.detach()
    parts["loss"] = total.detach()
    return total, parts
