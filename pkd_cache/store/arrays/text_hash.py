"""Each example's text hash, N x 16 bytes: blake2b-128 of its text(s) as the dump read them, before tokenising.
An incremental dump (commands/dump_reuse.py) finds the rows of a cached store it can reuse by it *before*
tokenising, and copies their tokens along with the teacher's outputs: with the same tokenizer and settings (the
cache key parts say so) the same text gives the same tokens. Written by the dump (it cannot be derived from the
other arrays). Held by stores whose metadata lists it in `extra_arrays`; older stores lack it."""
from __future__ import annotations

import hashlib
import struct
from typing import Optional, Sequence

from .kind import ArrayKind, Dims

NAME = "text_hash"
DIGEST = 16


def text_hashes(text_a: Sequence[str], text_b: Optional[Sequence[str]]):
    """N x 16 uint8: one digest per example. The hashed bytes are each text's UTF-8 length as 8 bytes little-endian
    then the text (`text_b`'s after `text_a`'s, for a pair), so no two different examples share their bytes."""
    import numpy as np

    out = bytearray()
    for i, a in enumerate(text_a):
        h = hashlib.blake2b(digest_size=DIGEST)
        for text in (a,) if text_b is None else (a, text_b[i]):
            raw = text.encode()
            h.update(struct.pack("<Q", len(raw)))
            h.update(raw)
        out += h.digest()
    return np.frombuffer(bytes(out), np.uint8).reshape(len(text_a), DIGEST).copy()


def _present(d: Dims) -> bool:
    return NAME in d.extras


KINDS = (ArrayKind(NAME, 9, lambda d: (d.n, DIGEST), "uint8", present=_present, in_batches=False),)
