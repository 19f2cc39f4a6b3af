"""Running the teacher over one sort window of examples: the logits and the [CLS] vector of every layer.

Length bucketing: within a window (dump's `sort_window`, a few chunks), examples are sorted by length and each batch
is padded only to its own longest sequence; the outputs are scattered back to the original order. The batches are a
pure function of the window (never of what came before), so a window recomputed by `--resume` is computed exactly as
it was the first time.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.inference_mode()
def teacher_outputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B x C, cls B x (L+1) x H): cls[:, 0] is the embedding output, cls[:, i] the output of layer i."""
    out = model(**inputs, output_hidden_states=True)
    cls = torch.stack([h[:, 0] for h in out.hidden_states], dim=1)  # cls: (batch, layers + 1, hidden)
    return out.logits.float(), cls


def chunk_batches(lengths: np.ndarray, batch_size: int, bucketed: bool) -> list[np.ndarray]:
    """Index arrays of the batches of one window: by length (longest first) when bucketed, else in order."""
    order = np.argsort(-lengths, kind="stable") if bucketed else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def autocast(device: torch.device, precision: str):
    """Mixed precision for the teacher forward: fp16/bf16 autocast on GPU, bf16 on CPU; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def run_chunk(model, tokens: dict[str, np.ndarray], batch_size: int, *, bucketed: bool, cls_dtype: np.dtype,
              device: torch.device, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(logits N x C float32, cls N x (L+1) x H in `cls_dtype`) for a window of tokenised examples, in its order.

    `bucketed=False` pads every batch to the full width (the original PKD code's `--pad-to-max-length`).
    """
    mask = tokens["attention_mask"]
    lengths = mask.sum(axis=1)
    n = len(lengths)
    logits = cls = None
    pin = device.type == "cuda"
    for idx in chunk_batches(lengths, batch_size, bucketed):
        width = int(lengths[idx].max()) if bucketed else mask.shape[1]
        inputs = {}
        for k, v in tokens.items():
            t = torch.from_numpy(np.ascontiguousarray(v[idx, :width])).long()
            inputs[k] = t.pin_memory().to(device, non_blocking=True) if pin else t
        with autocast(device, precision):
            lg, c = teacher_outputs(model, inputs)
        lg, c = lg.float().cpu().numpy(), c.to(torch.float32 if cls_dtype == np.float32 else torch.float16).cpu()
        # logits: (batch, labels); c: (batch, layers + 1, hidden)
        if logits is None:
            logits = np.empty((n, lg.shape[1]), np.float32)
            cls = np.empty((n,) + tuple(c.shape[1:]), cls_dtype)
        logits[idx] = lg
        cls[idx] = c.numpy()
    return logits, cls
