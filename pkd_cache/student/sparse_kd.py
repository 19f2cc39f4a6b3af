"""Token-level KD for causal-LM students from sparse teacher targets (issue 18); docs/TOKEN_KD.md has the maths.

Three losses, all per token and averaged over the real tokens (``mask``), all in the same convention:

* ``FullKDLoss``: the dense reference (online full-logit KD).
* ``SampledKDLoss``: ``sample:N`` targets, N ids drawn i.i.d. from the teacher, kept as unique ids + counts
  (Random-Sampling KD, Anshumann et al., ACL 2025). Its target q̂ = count/N is an unbiased estimate of the
  teacher's distribution p, and the loss is linear in the target, so its value and its gradient w.r.t. the student
  logits are unbiased estimates of ``FullKDLoss``'s (cross-entropy form).
* ``TopKKDLoss``: ``topk:K`` targets, the teacher's K largest log-probs plus one "rest" bucket holding the leftover
  mass. Biased (the tail is lumped), but calibrated in total mass; exact when K = V.

Convention: loss = T² · H(target, softmax(z_s / T)) — the cross-entropy, Hinton's T² as in
``student.losses.soft_loss`` (gradient magnitudes comparable across temperatures). ``objective="kl"`` subtracts the
teacher's entropy (full, or of the K+1 buckets; for sampled targets it must be passed in), which changes the
value, never the gradient. The teacher's side is NOT re-tempered by the loss: the targets must come from the teacher
at the loss's temperature (``sample_targets``/``topk_targets`` take it; a dump records it). Counts cannot be
re-tempered after the fact, and top-K log-probs cannot be renormalised at another temperature without the full
vocabulary. At T = 1 (the default) the T² is 1 and the losses are the plain cross-entropies. Per token, the
gradient w.r.t. the student logits is T · (s - target) for all three.

Causal alignment: at position t the teacher's output predicts token t+1; its target is compared with the
student's logits at the same position t (both shifted the same way), never with position t+1.

Shapes: student logits [T, V] (any [..., V] is flattened to [T, V], the other inputs alike); ``mask`` [T] bool,
True for the tokens that count (None: all). Masked tokens are dropped before any arithmetic: they contribute
nothing to the loss and get an exactly-zero gradient, even where their logits are inf or NaN. ``reduction``:
"mean" (over the real tokens; 0 if none), "sum", or "none" (a flat [T] of per-token losses, 0 at masked tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .gathered_nll import gathered_nll

_OBJECTIVES = ("ce", "kl")
_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _TokenKDLoss(torch.nn.Module):
    def __init__(self, temperature: float = 1.0, objective: str = "ce", reduction: str = "mean"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if objective not in _OBJECTIVES or reduction not in _REDUCTIONS:
            raise ValueError(f"objective must be one of {_OBJECTIVES} and reduction one of {_REDUCTIONS}, "
                             f"got {objective!r}, {reduction!r}")
        self.temperature, self.objective, self.reduction = float(temperature), objective, reduction

    def _rows(self, student_logits: torch.Tensor, mask: Optional[torch.Tensor], *per_token: torch.Tensor):
        """Flatten to [T, V] / [T, X], check the shapes, keep the rows of the real tokens."""
        if student_logits.dim() < 2:
            raise ValueError(f"student_logits must be [T, V], got shape {tuple(student_logits.shape)}")
        lead = student_logits.shape[:-1]
        z = _compute_dtype(student_logits).reshape(-1, student_logits.shape[-1])
        out = []
        for x in per_token:
            if x.shape[:-1] != lead:
                raise ValueError(f"a target of shape {tuple(x.shape)} does not match student_logits "
                                 f"{tuple(student_logits.shape)} (same leading dims expected)")
            out.append(x.reshape(z.shape[0], x.shape[-1]))
        if mask is None:
            mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        else:
            if mask.shape != lead:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not match student_logits "
                                 f"{tuple(student_logits.shape)}")
            mask = mask.reshape(-1).to(torch.bool)
        return mask, z[mask], [x[mask] for x in out]

    def _reduce(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """per_token: [T_real] losses (already T²-scaled). 'mean' is over the real tokens (0 when there are none)."""
        if self.reduction == "none":
            return per_token.new_zeros(mask.shape[0]).masked_scatter(mask, per_token)
        total = per_token.sum()  # per_token comes from z[mask]: a graph even when no token is real
        return total if self.reduction == "sum" else total / mask.sum().clamp_min(1)

    def _student_logprobs(self, z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(z / self.temperature, dim=-1)


class FullKDLoss(_TokenKDLoss):
    """Dense KD: T² · H(p, s) (or T² · KL(p ‖ s)); p = softmax(teacher_logits / T), s = softmax(student_logits / T)

    forward(student_logits [T, V], teacher_logits [T, V], mask [T] bool or None) -> scalar ([T] for 'none').
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                             f"{tuple(student_logits.shape)} must have the same shape")
        mask, z, (t,) = self._rows(student_logits, mask, teacher_logits)
        lp_s = self._student_logprobs(z)
        lp_t = F.log_softmax(_compute_dtype(t).to(lp_s.dtype) / self.temperature, dim=-1)
        p = lp_t.exp()
        loss = -torch.where(p > 0, p * lp_s, 0).sum(-1)
        if self.objective == "kl":
            loss = loss + torch.where(p > 0, p * lp_t, 0).sum(-1)
        return self._reduce(loss * self.temperature ** 2, mask)


class SampledKDLoss(_TokenKDLoss):
    """RS-KD on ``sample:N`` targets: T² · Σ_j -(c_j / N_t) · log s(id_j), s = softmax(student_logits / T).

    forward(student_logits [T, V] float, ids [T, M] int64, counts [T, M] int or float (0 = padding slot),
    mask [T] bool or None, teacher_entropy [T] or None) -> scalar ([T] for 'none').

    N_t = Σ_j c_j (the draws of token t). With q̂ = c/N an unbiased estimate of p, E[loss] = T² · H(p, s) and
    E[∂loss/∂z_s] = T · (s - p) per token: FullKDLoss's cross-entropy value and gradient (the proposal is p itself,
    so the importance weights p/q are 1 and q̂ needs no teacher probability at all). Padding slots (count 0)
    contribute nothing whatever their id (even an out-of-range one); a token whose counts are all 0 counts as
    masked. ``objective="kl"`` needs ``teacher_entropy`` (H(p) at the same temperature, from the dump) and
    subtracts it: then E[loss] = T² · KL(p ‖ s) (with "ce", teacher_entropy is ignored).
    """

    def forward(self, student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                mask: Optional[torch.Tensor] = None, teacher_entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ids.shape != counts.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and counts {tuple(counts.shape)} must have the same shape")
        if self.objective == "kl" and teacher_entropy is None:
            raise ValueError("objective='kl' on sampled targets needs teacher_entropy (the counts cannot give it)")
        lead = student_logits.shape[:-1]
        if counts.shape[:-1] != lead or (mask is not None and mask.shape != lead):
            raise ValueError(f"counts {tuple(counts.shape)} / mask do not match student_logits "
                             f"{tuple(student_logits.shape)} (same leading dims expected)")
        has_draws = (counts > 0).any(-1).to(student_logits.device)
        mask = has_draws if mask is None else mask.to(torch.bool) & has_draws
        extra = () if teacher_entropy is None else (teacher_entropy.unsqueeze(-1),)
        mask, z, (ids, counts, *ent) = self._rows(student_logits, mask, ids, counts, *extra)
        nll = gathered_nll(z / self.temperature, torch.where(counts > 0, ids.long(), 0))
        return self._reduce(self.per_token(nll, counts, *ent), mask)

    def per_token(self, nll: torch.Tensor, counts: torch.Tensor,
                  teacher_entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of each row [T] (T²-scaled), from the student's negative log-probs at the loss temperature of
        the rows' sampled ids, nll [T, M] (`gathered_nll`; any value at a padding slot), and their counts [T, M]
        (rows already masked): for a caller that gathers more per row in one go (TokenKD: the next token too)."""
        c = counts.to(nll.dtype)
        real = c > 0
        q = c / c.sum(-1, keepdim=True).clamp_min(1e-30)
        loss = torch.where(real, q * nll, 0).sum(-1)
        if self.objective == "kl":
            loss = loss - teacher_entropy.reshape(-1).to(loss.dtype)
        return loss * self.temperature ** 2


class TopKKDLoss(_TokenKDLoss):
    """Top-K with a leftover bucket: T² · H over K+1 buckets (or KL between the two K+1-bucket distributions).

    forward(student_logits [T, V], ids [T, K] int64, teacher_logprobs [T, K] (log p at the loss temperature),
    mask [T] bool or None) -> scalar ([T] for 'none').

    Buckets: the K ids, with teacher mass p_k and student mass s_k; and "rest", with teacher mass
    r = max(0, 1 - Σ_k p_k) and student mass 1 - Σ_k s_k, computed as a logsumexp of the student's log-probs over
    the ids NOT in the top K (no cancellation when the top K hold nearly all the mass).
    Why a rest bucket rather than renormalising the K: renormalising inflates every top-K target by 1/Σ_k p_k and
    tells the student the rest has probability 0, so the optimum puts all its mass on the K ids (over-confident,
    badly calibrated). With the bucket the target is an exact coarsening of p (total mass kept): the KL between the
    coarsened distributions is a lower bound of the full KL (data processing), biased (inside the rest bucket the
    gradient follows the student's own shape, s_i·(1 - r/s_rest), not p's), but the student's total mass on the
    top K is pulled to the teacher's Σ_k p_k. K = V is exactly FullKDLoss.
    """

    def forward(self, student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ids.shape != teacher_logprobs.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} "
                             f"must have the same shape")
        mask, z, (ids, lp_t) = self._rows(student_logits, mask, ids, teacher_logprobs)
        return self._reduce(self.per_token(self._student_logprobs(z), ids, lp_t), mask)

    def per_token(self, lp_s: torch.Tensor, ids: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
        """The loss of each row [T] (T²-scaled) from the student's log-probs at the loss temperature lp_s [T, V]
        and the rows' targets (already masked): for a caller that has lp_s already (TokenKD at T = 1)."""
        ids = ids.long()
        lp_t = _compute_dtype(lp_t).to(lp_s.dtype)
        in_top = torch.zeros_like(lp_s, dtype=torch.bool).scatter(-1, ids, True)
        no_rest = in_top.all(-1)  # K covers the vocabulary: no rest bucket (and no -inf logsumexp to backprop)
        rest_logits = lp_s.masked_fill(in_top, float("-inf")).masked_fill(no_rest.unsqueeze(-1), 0.0)
        lp_s_rest = rest_logits.logsumexp(-1)
        p = lp_t.exp()
        r = torch.where(no_rest, 0.0, (1 - p.sum(-1)).clamp_min(0))
        loss = -torch.where(p > 0, p * lp_s.gather(-1, ids), 0).sum(-1) - torch.where(r > 0, r * lp_s_rest, 0)
        if self.objective == "kl":
            loss = loss + torch.where(p > 0, p * lp_t, 0).sum(-1) + torch.special.xlogy(r, r)
        return loss * self.temperature ** 2


@torch.no_grad()
def sample_targets(teacher_logits: torch.Tensor, n: int, generator: Optional[torch.Generator] = None,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample:n`` targets: n i.i.d. draws per row from softmax(teacher_logits / temperature), as ids + counts.

    teacher_logits [T, V] -> (ids [T, M] int64, counts [T, M] int64), M = the largest number of unique ids in a
    row; each row's ids ascending, then padding (id 0, count 0). Counts sum to n per row. Vectorised: multinomial,
    sort, run-length encode. The same generator state gives the same targets.
    """
    if n < 1 or not temperature > 0:
        raise ValueError(f"n must be >= 1 and temperature > 0, got n={n}, temperature={temperature}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [T, V], got shape {tuple(teacher_logits.shape)}")
    rows = teacher_logits.shape[0]
    if rows == 0:
        empty = torch.zeros(0, 0, dtype=torch.long, device=teacher_logits.device)
        return empty, empty.clone()
    p = F.softmax(_compute_dtype(teacher_logits) / temperature, dim=-1)
    draws = torch.multinomial(p, n, replacement=True, generator=generator).sort(dim=-1).values
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.cumsum(-1) - 1  # [T, n]: which unique id each draw is
    m = int(slot[:, -1].max()) + 1
    ids = torch.zeros(rows, m, dtype=torch.long, device=draws.device)
    ids.scatter_(-1, slot, draws)  # every draw of a run writes the same id
    counts = torch.zeros(rows, m, dtype=torch.long, device=draws.device).scatter_add_(-1, slot, torch.ones_like(draws))
    return ids, counts


@torch.no_grad()
def topk_targets(teacher_logits: torch.Tensor, k: int,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk:k`` targets: teacher_logits [T, V] -> (ids [T, k] int64, logprobs [T, k]), the k largest
    log_softmax(teacher_logits / temperature) per row, largest first."""
    if not 1 <= k <= teacher_logits.shape[-1] or not temperature > 0:
        raise ValueError(f"k must be in [1, {teacher_logits.shape[-1]}] and temperature > 0, got k={k}, "
                         f"temperature={temperature}")
    lp = F.log_softmax(_compute_dtype(teacher_logits) / temperature, dim=-1)
    values, ids = lp.topk(k, dim=-1)
    return ids, values
