"""A causal LM's head run a block of positions at a time, so that the dump never holds a whole batch's logits.

`model(...)` ends with logits [B, W, V] for every position of the batch. At a 128k vocabulary and 32 x 1,024
positions that is 16 GiB in float32, which `dump --task lm` would only read once, to draw samples or take the top k.
Instead the dump runs the model's body (`model.base_model`: the embeddings, the blocks, the final norm) over the
batch, then its output embeddings (`model.get_output_embeddings()`) over `block_rows` positions at a time, and draws
each block's targets while its logits are still in cache. The targets do not change: every draw depends only on its
own row's logits (teacher/token_targets.py), and the top k of a row only on that row.

This is used only where it gives the model's own logits. `split_head` runs both ways on a probe batch and keeps the
split only when head(body(x)) equals model(x).logits bit for bit (the same matmul on the same rows). A model whose
forward changes the logits after the head (Gemma-2's soft-capping, Cohere's logit_scale, Granite's logits_scaling)
fails that check, and its dump runs the whole forward as before. Blocks of other sizes than the probe's may round
differently on some devices (another matmul kernel): a draw within rounding of a CDF step, which the format allows
(docs/FORMAT.md); the blocks are a fixed plan of each teacher batch, so a resumed dump rewrites the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .run import autocast

# logits per block: 2^22 on the CPU (16 MiB of float32, in the last-level cache while the draws read it) and 2^26
# elsewhere (256 MiB: the GPU's matmuls stay large)
_BLOCK_CPU, _BLOCK_OTHER = 1 << 22, 1 << 26


@dataclass(frozen=True)
class SplitHead:
    """The two halves of a causal LM: `body(input_ids, attention_mask, ...)` -> last_hidden_state [B, W, H], and
    `head` [.., H] -> logits [.., V]."""

    body: torch.nn.Module
    head: torch.nn.Module


def block_rows(vocab: int, device: torch.device) -> int:
    """Positions per block of the head: a bounded number of logits (at least one row)."""
    return max(1, (_BLOCK_CPU if torch.device(device).type == "cpu" else _BLOCK_OTHER) // max(1, vocab))


@torch.no_grad()
def split_head(model, probe_ids: torch.Tensor, precision: str = "fp32") -> Optional[SplitHead]:
    """The model's body and head if head(body(probe_ids)) gives model(probe_ids).logits exactly, else None (the
    model has no separate body or head, its body does not run alone, or its forward changes the logits after the
    head).

    probe_ids: [B, W] int64 on the model's device. `precision`: the dump's `--precision` (teacher/run.py's
    autocast), so the probe compares what the dump will compute."""
    body, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if body is None or body is model or head is None:
        return None
    mask = torch.ones_like(probe_ids)
    try:
        with autocast(probe_ids.device, precision):
            want = model(input_ids=probe_ids, attention_mask=mask).logits
            got = head(body(input_ids=probe_ids, attention_mask=mask).last_hidden_state)
    except Exception:  # a body that does not run on its own: the whole forward is the safe way
        return None
    return SplitHead(body, head) if got.shape == want.shape and torch.equal(got, want) else None
