"""A token store's sparse teacher targets, one row (chunk of C tokens) at a time: coded with store/sparse_codec.py
into P byte streams, laid back to back in a fixed-size `targets` row (zero after them) with their sizes in
`target_bytes` (store/arrays/lm.py).

The row size (`slot_bytes`) is the worst case the codes can take for C tokens, so every row fits and the arrays
have fixed shapes like every other array of a store; the zeros after a row's streams compress to almost nothing
(Blosc/zstd), and a reader decodes only the streams' bytes. Streams, by `--logits`:

    sample:N   n_unique (C values of the smallest unsigned type that holds N), ids (Rice-coded gaps), counts (gamma)
    topk:K     ids (Rice-coded gaps, m = K), logprobs (C x K float16, little endian)

Worst cases: a token with m unique ids costs at most (V - m) >> k + m (k + 1) bits of Rice-coded gaps, k the
codec's parameter for m (its gaps sum to at most V - m); its m - 1 stored counts, each c costing 2 floor(log2 c) + 1
<= 2c - 1 bits, at most 2N bits.
"""
from __future__ import annotations

import numpy as np

from ..logit_spec import LogitSpec
from . import sparse_codec as codec


def _count_dtype(n: int) -> np.dtype:
    return np.dtype(np.uint8 if n <= 0xFF else np.uint16 if n <= 0xFFFF else np.uint32)


def _rice_bits_max(m_max: int, vocab: int, exact_m: bool) -> int:
    """The most bits one token's Rice-coded ids take, over m in [1, m_max] (or m = m_max alone)."""
    m = np.array([m_max]) if exact_m else np.arange(1, m_max + 1, dtype=np.int64)
    k = codec._rice_k(m, vocab)
    return int((((vocab - m) >> k) + m * (k + 1)).max())


def slot_bytes(spec: LogitSpec, vocab: int, chunk_tokens: int) -> int:
    """Bytes of a `targets` row: the worst case of C tokens' coded streams (0 for `none`)."""
    c = chunk_tokens
    if spec.kind == "sample":
        m = min(spec.count, vocab)
        return (c * _count_dtype(spec.count).itemsize + -(-c * _rice_bits_max(m, vocab, False) // 8)
                + -(-c * 2 * spec.count // 8))
    if spec.kind == "topk":
        return -(-c * _rice_bits_max(spec.count, vocab, True) // 8) + c * spec.count * 2
    return 0


def encode_row(spec: LogitSpec, first, second, vocab: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """One row's targets -> (its `targets` row, uint8 [slot]; its `target_bytes`, int64 [P]).

    sample: first = ids [t, M], second = counts [t, M] (sparse_kd.sample_targets' layout);
    topk: first = ids [t, K], second = log-probs [t, K]. t <= C: the last row of a store may hold fewer tokens."""
    if spec.kind == "sample":
        coded = codec.encode_sampled(first, second, spec.count, vocab)
        streams = [coded["n_unique"].astype(_count_dtype(spec.count).newbyteorder("<"), copy=False),
                   coded["ids"], coded["counts"]]
    else:
        coded = codec.encode_topk(first, second, vocab)
        streams = [coded["ids"], coded["logprobs"].astype("<f2", copy=False)]
    raw = [np.ascontiguousarray(s).view(np.uint8).reshape(-1) for s in streams]
    sizes = np.array([len(r) for r in raw], dtype=np.int64)
    if sizes.sum() > slot:  # cannot happen (slot_bytes is the worst case); a clear error if the bound is wrong
        raise ValueError(f"coded targets take {int(sizes.sum()):,} bytes, more than a row's {slot:,}")
    row = np.zeros(slot, np.uint8)
    row[:sizes.sum()] = np.concatenate(raw) if raw else row[:0]
    return row, sizes


def decode_row(spec: LogitSpec, row: np.ndarray, sizes: np.ndarray, tokens: int, vocab: int):
    """The inverse of `encode_row` for a row of `tokens` tokens: sample -> (ids [t, M], counts [t, M]) int64;
    topk -> (ids [t, K] int64, logprobs [t, K] float32). Raises ValueError (one message) on a malformed row."""
    ends = np.cumsum(sizes)
    if len(sizes) != spec.parts or (sizes < 0).any() or (len(ends) and ends[-1] > len(row)):
        raise ValueError(f"target sizes {sizes.tolist()} do not fit a row of {len(row):,} bytes")
    parts = np.split(row[:ends[-1]], ends[:-1]) if len(ends) else []
    if spec.kind == "sample":
        dtype = _count_dtype(spec.count).newbyteorder("<")
        if len(parts[0]) != tokens * dtype.itemsize:
            raise ValueError(f"n_unique holds {len(parts[0]):,} bytes, not {tokens:,} values")
        return codec.decode_sampled({"n_unique": parts[0].view(dtype), "ids": parts[1], "counts": parts[2]},
                                    spec.count, vocab)
    if len(parts[1]) != tokens * spec.count * 2:
        raise ValueError(f"logprobs hold {len(parts[1]):,} bytes, not {tokens:,} x {spec.count} float16 values")
    ids, logprobs, _ = codec.decode_topk({"ids": parts[0], "logprobs": parts[1].view("<f2").astype(np.float16)},
                                         spec.count, vocab)
    return ids, logprobs
