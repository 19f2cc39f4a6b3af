"""int8 storage of CLS vectors: symmetric, one float32 scale per vector (per example and layer).

    scale = max(|x|) / 127,  q = round(x / scale)  in [-127, 127],  x ≈ q * scale

The patient loss compares L2-normalised vectors, so what matters is each vector's direction: a per-vector scale
keeps the relative error of every vector (not just of the largest ones) at about 1/254 of its largest component.
"""
from __future__ import annotations

import numpy as np


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: (..., H) float -> (q: (..., H) int8, scale: (...) float32)."""
    x = x.astype(np.float32, copy=False)
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype=np.float16) -> np.ndarray:
    """(..., H) int8 and (...) scales -> (..., H) `dtype`."""
    return (q.astype(np.float32) * scale[..., None]).astype(dtype)
