"""On-disk coding of sparse token-level teacher targets (issue 18): one chunk of T tokens <-> flat numpy arrays.

Bit streams: a value of width w is written MSB first (bit w-1 down to bit 0), values back to back, cut into bytes
by np.packbits (the first bit is the top bit of byte 0), the last byte padded with 0 bits. A decoder checks the byte
count and the zero padding, so a chunk has one coding only. Codes (each stream: all unary parts, then all the rest):
  unary(x)       x one bits, then a zero bit.
  Rice_k(g)      unary(g >> k), then the k low bits of g: (g >> k) + 1 + k bits.
  gamma(c), c>=1 L = floor(log2 c): unary(L), then the L bits of c below its leading 1: 2L + 1 bits (c = 1: 1 bit).

sample:N (per token, m_t unique ids of N draws with their counts; sparse_kd.sample_targets) -> 3 arrays:
  n_unique [T] uint8 (uint16 if N > 255, uint32 if N > 65535): m_t, 1 <= m_t <= min(N, V).
  ids      uint8 [ceil(sum_t sum_j ((g_tj >> k_t) + 1 + k_t) / 8)]: each token's ids ascending, as gaps g_0 = id_0,
           g_j = id_j - id_{j-1} - 1, Rice-coded with k_t = floor(log2(max(1, (V - m_t) // (m_t + 1)))) (the mean
           gap; derived, not stored); all gaps of the chunk, token-major.
  counts   uint8 [ceil(sum (2 L + 1) / 8)]: the counts of each token's first m_t - 1 ids, gamma-coded, token-major;
           the last count is N minus their sum (>= 1), not stored.
topk:K (the K largest teacher log-probs; sparse_kd.topk_targets) -> 2 arrays:
  ids      uint8: each token's K ids ascending, coded as sample's `ids` with m_t = K.
  logprobs [T * K] float16: log p of each id, in the same (ascending id) order.

Why: the ids of a token are a set, so sorting them and Rice-coding the gaps costs within ~1.5% of log2 C(V, m)
bits: at V = 128,256, 14% (sample:64) to 27% (topk:64) less than fixed-width ids (ceil(log2 V) bits each) or byte
varints of the gaps. The bits are near-random and Blosc gains nothing on them. Counts are mostly 1: gamma takes
~2.8 bits per stored count, less than uint8 (count - 1) even after zstd. For top-K, the ascending-id order costs
the float16 log-probs ~23 B/token of compressibility (K = 64) against largest-first order, but saves ~37 B/token
of ids, and makes the ids unique by construction. Measured in benchmarks/bench_token_bytes.py.

float16 log-probs suffice: any p a float32 softmax gives has |log p| < 104, far inside float16's range (-inf stays
-inf), and float16 rounds log p to a relative 2^-11, a relative error of |log p| * 2^-11 on p (< 1% for p > 1e-9,
< 5% for any p) and an absolute one of p |log p| 2^-11 <= 1.8e-4. The rest bucket (1 - the K p's sum) is NOT
stored: TopKKDLoss derives it from the K values itself, and float16 moves it by at most 2^-11 * sum_k p_k |log p_k|
(the top K's part of the teacher's entropy in nats, / 2048: <= 3.5e-4 measured), the size of the p_k's own errors.
Relative to a tiny true rest (1e-10) that is large, but the loss weights each target by its mass: the TopKKDLoss
value moves by < 1e-3 relative (tests/test_sparse_codec.py, realistic cases), far below the sampling noise of
sample:N. decode_topk returns the rest as log(max(0, 1 - sum exp)), and the ids ascending, not largest-first
(the losses do not depend on the order).

Decoding checks everything (array dtypes and lengths, stream lengths and padding, m_t in range, ids < V, counts
>= 1 summing to N, log-probs <= 0, not NaN, their p summing to <= 1.01) and raises ValueError with one message
otherwise, never allocating more than a valid chunk of as many tokens would need. It cannot see a flipped bit that
still codes valid targets (a remainder bit, say): that is the store's chunk checksums' job. Where store/_bits.c is
built, it decodes valid streams straight into the padded rows (`rice_rows`, `gamma_rows`: about 3x less time per
chunk than the numpy bit planes); the numpy code below stays the definition, decodes where it is not built, and names
what is wrong with any stream the C code refuses.
"""
from __future__ import annotations

import numpy as np

_POW2 = np.left_shift(np.int64(1), np.arange(63, dtype=np.int64))

try:  # store/_bits.c (optional): `_stream` in one C pass instead of a numpy pass per bit plane
    from ._bits import pack_codes as _pack_codes
except ImportError:  # pragma: no cover - the numpy version is tested on its own (tests/test_sparse_codec.py)
    _pack_codes = None
try:  # and the reader's decoding of valid chunks straight into rows (an older build of _bits lacks it)
    from ._bits import gamma_rows as _gamma_rows, rice_rows as _rice_rows
except ImportError:  # pragma: no cover
    _gamma_rows = _rice_rows = None


def id_bits(vocab_size: int) -> int:
    """ceil(log2(vocab_size)): the bits of one id (0 for a vocabulary of one)."""
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return (int(vocab_size) - 1).bit_length()


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """floor(log2 x) of integers x >= 1, exactly (no float rounding)."""
    return np.searchsorted(_POW2, x, side="right") - 1


def _rice_k(m: np.ndarray, vocab_size: int) -> np.ndarray:
    return _floor_log2(np.maximum(1, (vocab_size - m) // (m + 1)))


def _to_bits(values: np.ndarray, widths) -> np.ndarray:
    """values [n] (< 2^width each), widths [n] or one int -> their 0/1 uint8 bits, MSB first, back to back.
    One vectorised pass per bit plane (at most 63), never a Python loop over the values."""
    values = np.asarray(values, dtype=np.int64)
    if np.ndim(widths) == 0:
        w = int(widths)
        out = np.empty(values.size * w, np.uint8)
        for j in range(w):
            out[j::w] = (values >> (w - 1 - j)) & 1
        return out
    widths = np.asarray(widths, dtype=np.int64)
    start = np.cumsum(widths) - widths
    out = np.empty(int(widths.sum()), np.uint8)
    for j in range(int(widths.max()) if widths.size else 0):
        sel = np.flatnonzero(widths > j)
        out[start[sel] + j] = (values[sel] >> (widths[sel] - 1 - j)) & 1
    return out


def _from_bits(bits: np.ndarray, widths) -> np.ndarray:
    """The inverse of _to_bits (len(bits) == the widths' sum; one int: len(bits) a multiple of it) -> int64."""
    if np.ndim(widths) == 0:
        w = int(widths)
        values = np.zeros(bits.size // w if w else 0, np.int64)
        for j in range(w):
            values = (values << 1) | bits[j::w]
        return values
    widths = np.asarray(widths, dtype=np.int64)
    start = np.cumsum(widths) - widths
    values = np.zeros(widths.size, np.int64)
    for j in range(int(widths.max()) if widths.size else 0):
        sel = np.flatnonzero(widths > j)
        values[sel] = (values[sel] << 1) | bits[start[sel] + j]
    return values


def _unary_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ones(int(x.sum()) + x.size, np.uint8)
    bits[np.cumsum(x + 1) - 1] = 0
    return bits


def _bits_of(packed, what: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.ndim != 1 or packed.dtype != np.uint8:
        raise ValueError(f"{what}: expected a 1-D uint8 array, got {packed.dtype} of shape {packed.shape}")
    return np.unpackbits(packed)


def _end_of_stream(bits: np.ndarray, used: int, what: str) -> None:
    if (used + 7) // 8 * 8 != bits.size or bits[used:].any():
        raise ValueError(f"{what}: {bits.size // 8} bytes where the coded values take {used} bits "
                         f"(truncated, too long, or non-zero padding)")


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """ids (any shape, ints in [0, 2^bits)) -> uint8 bytes: `bits` bits each, MSB first, back to back, 0-padded."""
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "ui":
        raise ValueError(f"pack_ids: ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or (bits < 63 and ids.max() >> bits)):
        raise ValueError(f"pack_ids: ids must lie in [0, 2^{bits}), got [{ids.min()}, {ids.max()}]")
    return np.packbits(_to_bits(ids, bits))


def unpack_ids(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of pack_ids: `count` ids (int64). ValueError unless packed has exactly the bytes they take."""
    all_bits = _bits_of(packed, "packed ids")
    _end_of_stream(all_bits, bits * count, f"{count} ids of {bits} bits")
    return _from_bits(all_bits[:bits * count], bits) if bits else np.zeros(count, np.int64)


def _widths(k: np.ndarray):
    """k as one int where every value has the same width > 0 (the fast, strided path of _to_bits/_from_bits)."""
    return int(k[0]) if k.size and k[0] > 0 and (k == k[0]).all() else k


def _stream(unary: np.ndarray, values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """One coded stream: the unary codes of `unary`, then `values` in `widths` bits each, packed (uint8)."""
    if _pack_codes is not None:
        return np.frombuffer(_pack_codes(*(np.ascontiguousarray(a, dtype=np.int64) for a in (unary, values, widths))),
                             np.uint8)
    return np.packbits(np.concatenate([_unary_bits(unary), _to_bits(values, _widths(widths))]))


def _encode_rice(ids_flat: np.ndarray, m: np.ndarray, vocab_size: int) -> np.ndarray:
    first = np.zeros(ids_flat.size, bool)
    first[(np.cumsum(m) - m)[m > 0]] = True
    gaps = ids_flat - 1 - np.where(first, -1, np.roll(ids_flat, 1))
    k = np.repeat(_rice_k(m, vocab_size), m)
    return _stream(gaps >> k, gaps & ((1 << k) - 1), k)


def _unary_values(bits: np.ndarray, count: int, what: str) -> tuple[np.ndarray, int]:
    zeros = np.flatnonzero(bits == 0)[:count]
    if zeros.size < count:
        raise ValueError(f"{what}: the stream ends before its {count} values (truncated)")
    return np.diff(zeros, prepend=-1) - 1, (int(zeros[-1]) + 1 if count else 0)


def _decode_rice(packed, m: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    bits, total = _bits_of(packed, what), int(m.sum())
    q, used = _unary_values(bits, total, what)
    k = np.repeat(_rice_k(m, vocab_size), m)
    if total and (q > ((vocab_size - 1) >> k)).any():
        raise ValueError(f"{what}: a gap beyond the vocabulary of {vocab_size}")
    rem_bits = int(k.sum())
    _end_of_stream(bits, used + rem_bits, what)
    gaps = (q << k) | _from_bits(bits[used:used + rem_bits], _widths(k))
    run, first = np.cumsum(gaps + 1), (np.cumsum(m) - m)[m > 0]
    ids = run - 1 - np.repeat(run[first] - gaps[first] - 1, m[m > 0])
    if total and ids.max() >= vocab_size:
        raise ValueError(f"{what}: an id >= the vocabulary size {vocab_size}")
    return ids


def _compiled_rows(decode, packed, m: np.ndarray, param: int):
    """[T, max m] int64 rows of a valid stream, decoded by store/_bits.c (`decode`: rice_rows with param V, or
    gamma_rows with param n); None where it is not built or the stream is not valid: the numpy code then decodes
    it, or says what is wrong with it."""
    if decode is None or not (isinstance(packed, np.ndarray) and packed.ndim == 1 and packed.dtype == np.uint8):
        return None
    rows = decode(np.ascontiguousarray(packed), np.ascontiguousarray(m, dtype=np.int64), param)
    return None if rows is None else np.frombuffer(rows, np.int64).reshape(m.size, int(m.max()) if m.size else 0)


def _rows(flat: np.ndarray, m: np.ndarray, fill=0) -> np.ndarray:
    out = np.full((m.size, int(m.max()) if m.size else 0), fill, dtype=flat.dtype)
    out[np.arange(m.size).repeat(m), np.arange(flat.size) - np.repeat(np.cumsum(m) - m, m)] = flat
    return out


def _check_ids(ids: np.ndarray, real: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size and (ids[real].min(initial=0) < 0 or ids[real].max(initial=0) >= vocab_size):
        raise ValueError(f"{what}: ids must lie in [0, {vocab_size})")
    nxt = real[:, 1:]
    if (nxt & (ids[:, 1:] <= ids[:, :-1])).any():
        raise ValueError(f"{what}: each token's ids must be strictly ascending (unique)")


def encode_sampled(ids, counts, n: int, vocab_size: int) -> dict[str, np.ndarray]:
    """sample:n targets of T tokens (ids, counts [T, M] as sample_targets gives them) -> {n_unique, ids, counts}."""
    ids, counts = np.asarray(ids, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != counts.shape:
        raise ValueError(f"ids and counts must both be [T, M], got {ids.shape} and {counts.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    real = counts > 0
    m = real.sum(1)
    if (counts < 0).any() or (real[:, 1:] & ~real[:, :-1]).any() or (ids[~real] != 0).any():
        raise ValueError("counts must be >= 1 for the real ids, then padding (id 0, count 0)")
    if (counts.sum(1) != n).any():
        raise ValueError(f"each token's counts must sum to n = {n}")
    _check_ids(ids, real, vocab_size, "encode_sampled")
    firsts = real.copy()
    firsts[np.arange(m.size), np.maximum(m - 1, 0)] = False  # the last count of each token is implied
    c = counts[firsts]
    lengths = _floor_log2(c)
    return {"n_unique": m.astype(np.uint8 if n <= 0xFF else np.uint16 if n <= 0xFFFF else np.uint32),
            "ids": _encode_rice(ids[real], m, vocab_size),
            "counts": _stream(lengths, c - _POW2[lengths], lengths)}


def _n_unique(arrays: dict, n: int, vocab_size: int) -> np.ndarray:
    for key in ("n_unique", "ids", "counts"):
        if key not in arrays:
            raise ValueError(f"sampled targets: no {key!r} array")
    m = np.asarray(arrays["n_unique"])
    if m.ndim != 1 or m.dtype.kind not in "ui":
        raise ValueError(f"n_unique: expected a 1-D integer array, got {m.dtype} of shape {m.shape}")
    m = m.astype(np.int64)
    if m.size and (m.min() < 1 or m.max() > min(n, vocab_size)):
        raise ValueError(f"n_unique: every token has 1..{min(n, vocab_size)} unique ids (n = {n}, V = {vocab_size})")
    return m


def decode_sampled(arrays: dict, n: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of encode_sampled: (ids [T, M_max] int64 ascending, counts [T, M_max] int64), pad id 0 count 0."""
    if n < 1 or vocab_size < 1:
        raise ValueError(f"n and vocab_size must be >= 1, got {n}, {vocab_size}")
    m = _n_unique(arrays, n, vocab_size)
    ids = _compiled_rows(_rice_rows, arrays["ids"], m, vocab_size)
    counts = None if ids is None else _compiled_rows(_gamma_rows, arrays["counts"], m, n)
    if counts is not None:
        return ids, counts
    ids = _decode_rice(arrays["ids"], m, vocab_size, "sampled ids")
    bits, stored = _bits_of(arrays["counts"], "counts"), int((m - 1).sum())
    lengths, used = _unary_values(bits, stored, "counts")
    if stored and lengths.max() > _floor_log2(np.int64(n)):
        raise ValueError(f"counts: a count above n = {n}")
    _end_of_stream(bits, used + int(lengths.sum()), "counts")
    c = _POW2[lengths] + _from_bits(bits[used:used + int(lengths.sum())], lengths)
    head = _rows(c, m - 1)  # [T, max m - 1]
    last = n - head.sum(1)
    if (last < 1).any():
        raise ValueError(f"counts: a token's stored counts leave no draw of its {n} for its last id")
    counts = np.zeros((m.size, int(m.max()) if m.size else 0), np.int64)
    counts[:, :head.shape[1]] = head
    counts[np.arange(m.size), m - 1] = last
    return _rows(ids, m), counts


def _check_logprobs(lp: np.ndarray, what: str) -> np.ndarray:
    """lp [T, K]: each <= 0 or -inf, not NaN, and each token's K probabilities sum to at most 1 (+ 1% for rounding:
    float16 moves the sum by < 2^-11 ln K). Returns those sums (float64)."""
    if np.isnan(lp).any() or (lp > 0).any():
        raise ValueError(f"{what}: log-probabilities must be <= 0 (or -inf), not NaN")
    mass = np.exp(lp.astype(np.float64)).sum(1)
    if (mass > 1.01).any():
        raise ValueError(f"{what}: a token's {lp.shape[1]} probabilities sum to {mass.max():.4g} > 1")
    return mass


def encode_topk(ids, logprobs, vocab_size: int) -> dict[str, np.ndarray]:
    """topk:K targets (ids, logprobs [T, K], any order per row) -> {ids, logprobs}, stored ascending by id."""
    ids, lp = np.asarray(ids, dtype=np.int64), np.asarray(logprobs, dtype=np.float64)
    if ids.ndim != 2 or ids.shape != lp.shape or ids.shape[1] < 1:
        raise ValueError(f"ids and logprobs must both be [T, K], K >= 1, got {ids.shape} and {lp.shape}")
    order = np.argsort(ids, axis=1, kind="stable")
    ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    _check_ids(ids, np.ones(ids.shape, bool), vocab_size, "encode_topk")
    _check_logprobs(lp, "encode_topk")
    m = np.full(ids.shape[0], ids.shape[1], np.int64)
    return {"ids": _encode_rice(ids.reshape(-1), m, vocab_size), "logprobs": lp.astype(np.float16).reshape(-1)}


def decode_topk(arrays: dict, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of encode_topk: (ids [T, k] int64 ascending, logprobs [T, k] float32, rest_logprob [T] float32,
    log(1 - sum exp(logprobs)) clamped at 0 mass: -inf)."""
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}], got {k}")
    for key in ("ids", "logprobs"):
        if key not in arrays:
            raise ValueError(f"top-k targets: no {key!r} array")
    lp = np.asarray(arrays["logprobs"])
    if lp.ndim != 1 or lp.dtype != np.float16 or lp.size % k:
        raise ValueError(f"logprobs: expected a 1-D float16 array of T * {k} values, got {lp.dtype} {lp.shape}")
    mass = _check_logprobs(lp.reshape(-1, k), "top-k logprobs")
    m = np.full(lp.size // k, k, np.int64)
    ids = _compiled_rows(_rice_rows, arrays["ids"], m, vocab_size)
    ids = (_decode_rice(arrays["ids"], m, vocab_size, "top-k ids") if ids is None else ids).reshape(-1, k)
    with np.errstate(divide="ignore"):
        rest = np.log(np.maximum(0.0, 1.0 - mass)).astype(np.float32)
    return ids, lp.astype(np.float32).reshape(-1, k), rest
