"""The teacher's logits, N x C float32 (finite, like every float array: store/trust.py)."""
from __future__ import annotations

from .kind import ArrayKind

KINDS = (ArrayKind("logits", 4, lambda d: (d.n, d.num_labels), "float32"),)
