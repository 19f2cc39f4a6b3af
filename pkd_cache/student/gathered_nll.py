"""-log_softmax(z).gather(-1, ids) with one [T, V] buffer for the forward and backward (issue 18's distill speed).

A sparse token loss only ever reads a few log-probabilities per row: the next token's (CE) and the sampled ids'
(RS-KD). Autograd through `log_softmax(z).gather(ids)` allocates, in backward, a [T, V] zero tensor per gather to
scatter into, their sum, and log_softmax's own gradient: on a CPU each fresh [T, V] buffer costs about as much as a
pass over it (the pages are new), and these are the largest tensors of a small student's step. Here the forward
keeps its log-probabilities, and the backward turns that same buffer into the gradient in place (so it runs once:
no retain_graph):

    nll[t, j] = -log softmax(z[t])[ids[t, j]]
    d/dz[t, v] of sum_j g[t, j] * nll[t, j] = softmax(z[t])[v] * sum_j g[t, j] - sum_{j : ids[t, j] = v} g[t, j]

(repeated ids in a row add up, as the gathers' backward would). Same values and gradients as the autograd
version up to float rounding (tests/test_gathered_nll.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatheredNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lp = F.log_softmax(z, dim=-1)
        ctx.save_for_backward(ids)
        ctx.buffer = lp  # an intermediate, not an input or output: autograd never sees it change in place
        return -lp.gather(-1, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None:
            raise RuntimeError("gathered_nll's backward runs once: its log-probabilities became the gradient "
                               "(retain_graph=True cannot run it again)")
        return buffer.exp_().mul_(grad.sum(-1, keepdim=True)).scatter_add_(-1, ids, -grad), None


def gathered_nll(z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """z [T, V] float logits, ids [T, K] int (in [0, V)) -> [T, K]: -log softmax(z)[t, ids[t, j]]."""
    if z.dim() != 2 or ids.dim() != 2 or ids.shape[0] != z.shape[0]:
        raise ValueError(f"z must be [T, V] and ids [T, K], got {tuple(z.shape)} and {tuple(ids.shape)}")
    return _GatheredNLL.apply(z, ids.long())
