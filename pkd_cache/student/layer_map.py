"""Which teacher layer each student layer learns from (PKD-skip, PKD-last, or given).

Layers are numbered from 1 (index i of the store's `cls` array is the output of layer i). A k-layer student
has k-1 mapped layers: its last layer is covered by the logits. PKD-skip takes every (N/k)-th teacher layer
(12 -> 6: 2,4,6,8,10), PKD-last the k-1 layers below the top (12 -> 6: 7,8,9,10,11).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import PkdCacheError


def layer_map(teacher_layers: int, student_layers: int, strategy: str = "skip",
              given: Optional[Sequence[int]] = None) -> list[int]:
    n, k = teacher_layers, student_layers
    if k > n:
        raise PkdCacheError(f"a {k}-layer student is deeper than the store's {n}-layer teacher")
    if given is not None:
        given = list(given)
        if len(given) != k - 1:
            raise PkdCacheError(f"--layer-map needs {k - 1} teacher layers for a {k}-layer student "
                                f"(its last layer is covered by the logits), got {len(given)}")
        bad = [g for g in given if not 1 <= g <= n]
        if bad:
            raise PkdCacheError(f"--layer-map {','.join(map(str, given))}: layer(s) {','.join(map(str, bad))} out "
                                f"of range; the teacher has layers 1..{n}")
        return given
    if strategy == "skip":
        return [(i * n) // k for i in range(1, k)]
    if strategy == "last":
        return [n - k + i for i in range(1, k)]
    raise PkdCacheError(f"--strategy must be 'skip' or 'last', got {strategy!r}")
