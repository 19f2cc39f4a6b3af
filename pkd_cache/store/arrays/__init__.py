"""The kinds of array a store holds, one module each: tokens.py (input_ids, attention_mask, token_type_ids),
labels.py, logits.py and cls.py (the [CLS] vectors, and the scales of int8 ones).

Adding an array is one new module here whose `KINDS` lists `ArrayKind`s: store/format.py lays every kind out in
each split (shape, dtype, chunks, compressor), store/trust.py checks its values with its `check`, and the batch
stream reads it by name. What computes its values at dump time is the teacher's (teacher/run.py) and dump's.
Imports no numpy, so `ls` and `serve`, which read only metadata, stay light.
"""
from __future__ import annotations

import importlib
import pkgutil

from .kind import ArrayKind, Dims


def _discover() -> tuple[ArrayKind, ...]:
    kinds = []
    for info in pkgutil.iter_modules(__path__):
        if info.name != "kind":
            kinds += getattr(importlib.import_module(f"{__name__}.{info.name}"), "KINDS", ())
    names = [k.name for k in kinds]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two array kinds share a name: {sorted(names)}")
    return tuple(sorted(kinds, key=lambda k: (k.order, k.name)))


KINDS = _discover()  # every kind, in order
BY_NAME = {k.name: k for k in KINDS}

__all__ = ["ArrayKind", "Dims", "KINDS", "BY_NAME"]
