"""The examples' labels: class ids, or float scores for a regression task (STS-B)."""
from __future__ import annotations

from .kind import ArrayKind, below


def _classes(v, meta):
    return None if meta.task.is_regression else below(v, meta.task.num_labels, "labels")


KINDS = (ArrayKind("labels", 3, lambda d: (d.n,), lambda d: d.label_dtype, check=_classes),)
