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

    ids = np.asarray(tokens["input_ids"]).astype("<i4", copy=False)
    n = len(ids)
    # each row's bytes side by side (ids as int32 little-endian, then mask, then types): one hash call per row
    rows = np.concatenate([ids.view(np.uint8).reshape(n, -1),
                           np.asarray(tokens["attention_mask"]).astype("u1", copy=False).reshape(n, -1),
                           np.asarray(tokens["token_type_ids"]).astype("u1", copy=False).reshape(n, -1)], axis=1)
    digests = b"".join(hashlib.blake2b(row, digest_size=DIGEST).digest() for row in rows)
    return np.frombuffer(digests, np.uint8).reshape(n, DIGEST).copy()


def _present(d: Dims) -> bool:
    return NAME in d.extras


KINDS = (ArrayKind(NAME, 8, lambda d: (d.n, DIGEST), "uint8", present=_present, derive=row_hashes, in_batches=False),)
