"""Each example's content hash, N x 16 bytes: blake2b-128 of its token ids, attention mask and token type ids as
stored. Derived by the writer from the chunk's token arrays; an incremental dump (commands/dump_reuse.py) finds
the rows of a cached store it can reuse by it (the store's teacher, tokenizer and settings being the same, by its
cache key parts). Held by stores whose metadata lists it in `extra_arrays`; older stores lack it."""
from __future__ import annotations

import hashlib

from .kind import ArrayKind, Dims

NAME = "example_hash"
DIGEST = 16


def row_hashes(tokens: dict):
    """N x 16 uint8: one digest per row of the token arrays (`input_ids`, `attention_mask`, `token_type_ids`)."""
    import numpy as np

    ids, mask, types = (np.ascontiguousarray(tokens[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    ids = ids.astype("<i4", copy=False)
    out = np.empty((len(ids), DIGEST), np.uint8)
    for i in range(len(ids)):
        h = hashlib.blake2b(ids[i].tobytes(), digest_size=DIGEST)
        h.update(mask[i].astype("u1", copy=False).tobytes())
        h.update(types[i].astype("u1", copy=False).tobytes())
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


def _present(d: Dims) -> bool:
    return NAME in d.extras


KINDS = (ArrayKind(NAME, 8, lambda d: (d.n, DIGEST), "uint8", present=_present, derive=row_hashes, in_batches=False),)
