"""Issue 18: bytes per token of token-level caches (sparse logits, hidden states), Llama-3-8B and bert-base shapes.

    python benchmarks/bench_token_bytes.py [--tokens 65536] [--seed 0]

Codes one chunk of `--tokens` tokens with pkd_cache/store/sparse_codec.py (`sample:N`, `topk:K`) and compresses
each of its arrays as the store does (Blosc zstd-3, byte shuffle for multi-byte dtypes); hidden states as the
store's `cls` (Blosc lz4-5, shuffle; zstd-3 alongside), per layer per token, float16 and int8 (+ a float32 scale
per vector, store/quantize.py). Prints bytes per token coded (the arrays' bytes) and stored (after Blosc), the
coding alternatives that were measured against the chosen one, and the codec's speed (one core).

All data is SYNTHETIC (no real LM offline). Teacher distributions: per token, a Zipf-Mandelbrot law over ranks,
p(r) ∝ (r + 1)^-α, α = 2.45 · exp(0.35 · N(0, 1)) (a random temperature), which gives about 12 unique ids among 50
draws (RS-KD reports ~12 of 50 on real LMs; the measured mean is printed); ranks map to ids by a per-token
permutation of the vocabulary, so likely ids are spread over it and differ from token to token (real LMs share
frequent ids across tokens: more compressible than this, though the chosen coding does not exploit it). Sampling
is by inverse CDF over the ranks, never a dense softmax. Hidden states: Gaussian, per-dim scales
exp(0.3 · N(0, 1)), a per-token norm exp(0.2 · N(0, 1)), and 4 outlier dims 20x larger (LLMs have a few such dims).
Goals: `sample:64` at <= 40 B/token; at a 128k vocabulary below RS-KD's ~36 B/token (50 samples, ~12 unique).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from common import header, table
from numcodecs import Blosc, blosc

from pkd_cache.store import sparse_codec as sc
from pkd_cache.store.quantize import quantize_int8

MODELS = (("bert-base", 30_522, 12, 768), ("Llama-3-8B", 128_256, 32, 4096))  # name, vocab, layers, hidden
SAMPLES, TOPKS = (12, 50, 64), (12, 64, 128)
ZSTD = {1: Blosc("zstd", 3, Blosc.NOSHUFFLE), 2: Blosc("zstd", 3, Blosc.SHUFFLE)}
LZ4 = {1: Blosc("lz4", 5, Blosc.NOSHUFFLE), 2: Blosc("lz4", 5, Blosc.SHUFFLE)}


def stored(arrays, codecs=ZSTD) -> int:
    """Bytes after Blosc, each array compressed on its own (shuffle for multi-byte dtypes, as store/format.py)."""
    return sum(len(codecs[min(a.itemsize, 2)].encode(np.ascontiguousarray(a))) for a in arrays)


class Teacher:
    """Synthetic next-token distributions for `tokens` tokens over a vocabulary of `vocab` (module docstring).

    Per token, α_t = 2.45 · exp(0.35 · N(0, 1)). The head (the HEAD most likely ranks) has weights
    (r + 2)^-α_t · exp(0.5 · N(0, 1)) each, sorted: every token's top log-probs differ, as a real LM's do. The tail
    (ranks >= HEAD) follows (r + 2)^-α on a grid of 48 α values (precomputed CDFs; α_t snapped to the grid).
    """

    HEAD = 128

    def __init__(self, vocab: int, tokens: int, seed: int, grid: int = 48):
        rng = self.rng = np.random.default_rng(seed)
        self.vocab, self.tokens, h = vocab, tokens, self.HEAD
        self.alphas = 2.45 * np.exp(0.35 * np.linspace(-3, 3, grid))
        z = np.clip(rng.normal(size=tokens), -3, 3)
        alpha = 2.45 * np.exp(0.35 * z)
        self.group = np.rint((z / 3 + 1) / 2 * (grid - 1)).astype(int)
        logw = -np.outer(self.alphas, np.log(np.arange(h, vocab) + 2.0))
        top = logw.max(1, keepdims=True)
        tail = np.cumsum(np.exp(logw - top), axis=1)  # per grid α, ranks HEAD.. (unnormalised, scaled by e^top)
        self.tail_cdf = tail / tail[:, -1:]
        head = np.sort(-alpha[:, None] * np.log(np.arange(h) + 2.0) + 0.5 * rng.normal(size=(tokens, h)), axis=1)
        self.head_lw = head[:, ::-1]  # descending
        log_tail = top[self.group, 0] + np.log(tail[self.group, -1])
        self.logz = np.logaddexp(np.logaddexp.reduce(self.head_lw, axis=1), log_tail)
        self.head_cdf = np.cumsum(np.exp(self.head_lw - self.logz[:, None]), axis=1)  # [T, HEAD], < 1
        self.perm = rng.permutation(vocab)
        mult = rng.integers(1, vocab, size=tokens)
        while (bad := np.gcd(mult, vocab) != 1).any():
            mult[bad] = rng.integers(1, vocab, size=int(bad.sum()))
        self.mult, self.shift = mult, rng.integers(0, vocab, size=tokens)

    def ids(self, ranks: np.ndarray) -> np.ndarray:
        """ranks [T, X] -> ids: a bijection of the vocabulary per token."""
        return self.perm[(self.mult[:, None] * ranks + self.shift[:, None]) % self.vocab]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """sample:n targets, as sparse_kd.sample_targets gives them: ids ascending, counts, padding (0, 0)."""
        T, h = self.tokens, self.HEAD
        u = self.rng.random((T, n))
        rows = np.arange(T)[:, None]
        # inverse CDF over the head, all tokens at once: each row's CDF shifted by its row number
        ranks = np.searchsorted((self.head_cdf + rows).ravel(), (u + rows).ravel()).reshape(T, n) - rows * h
        head_mass = self.head_cdf[:, -1:]
        in_tail = u >= head_mass
        v = (u - head_mass) / (1 - head_mass)  # where in the tail
        for g in np.unique(self.group):
            sel = in_tail & (self.group == g)[:, None]
            ranks[sel] = h + np.minimum(np.searchsorted(self.tail_cdf[g], v[sel]), self.vocab - h - 1)
        draws = np.sort(self.ids(ranks), axis=1)
        start = np.ones(draws.shape, bool)
        start[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = np.cumsum(start, axis=1) - 1
        m = int(slot[:, -1].max()) + 1
        ids = np.zeros((T, m), np.int64)
        ids[rows, slot] = draws
        counts = np.bincount((rows * m + slot).ravel(), minlength=T * m).reshape(T, m)
        return ids, counts

    def topk(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """topk:k targets (k <= HEAD), largest first: ids [T, k], log-probs [T, k] float32."""
        lp = self.head_lw[:, :k] - self.logz[:, None]
        return self.ids(np.broadcast_to(np.arange(k), (self.tokens, k))), lp.astype(np.float32)


def hidden(tokens: int, size: int, rng) -> np.ndarray:
    dims = np.exp(0.3 * rng.normal(size=size))
    dims[rng.choice(size, 4, replace=False)] *= 20
    return rng.normal(size=(tokens, size)) * dims * np.exp(0.2 * rng.normal(size=(tokens, 1)))


def varint(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of values < 2^28 (the byte-oriented alternative to Rice)."""
    nbytes = 1 + (values >= 1 << 7) + (values >= 1 << 14) + (values >= 1 << 21)
    out = np.zeros((values.size, 4), np.uint8)
    for j in range(4):
        out[:, j] = ((values >> (7 * j)) & 0x7F) | np.where(nbytes > j + 1, 0x80, 0)
    return out[np.arange(4) < nbytes[:, None]]


def alternatives(t: Teacher, n: int, k: int) -> list[tuple]:
    """The codings measured against the chosen one, on `sample:n` and `topk:k` targets of `t`."""
    V, T = t.vocab, t.tokens
    ids, counts = t.sample(n)
    real = counts > 0
    m = real.sum(1)
    chosen = sc.encode_sampled(ids, counts, n, V)
    flat = ids[real]
    gaps = flat - 1 - np.where((np.cumsum(real, 1) == 1)[real], -1, np.roll(flat, 1))
    last = np.zeros_like(real)
    last[np.arange(T), m - 1] = True
    head = (counts[real & ~last] - 1).astype(np.uint8)
    rows = []
    for name, arr in (("ids: fixed-width bit-packed, absolute", sc.pack_ids(flat, sc.id_bits(V))),
                      ("ids: gaps as LEB128 varint bytes", varint(gaps)),
                      ("ids: gaps Rice-coded (chosen)", chosen["ids"]),
                      ("counts: count - 1 as uint8, last implied", head),
                      ("counts: Elias gamma bits, last implied (chosen)", chosen["counts"]),
                      ("n_unique: uint8", chosen["n_unique"])):
        rows.append((f"sample:{n}", name, f"{arr.nbytes / T:.1f}", f"{stored([arr]) / T:.1f}"))
    tid, tlp = t.topk(k)
    order = np.argsort(tid, axis=1)
    for name, arr in (("ids: fixed-width bit-packed, largest first", sc.pack_ids(tid, sc.id_bits(V))),
                      ("ids: ascending, Rice-coded gaps (chosen)", sc.encode_topk(tid, tlp, V)["ids"]),
                      ("logprobs float16, largest first", tlp.astype(np.float16).ravel()),
                      ("logprobs float16, ascending id (chosen)",
                       np.take_along_axis(tlp, order, 1).astype(np.float16).ravel())):
        rows.append((f"topk:{k}", name, f"{arr.nbytes / T:.1f}", f"{stored([arr]) / T:.1f}"))
    return rows


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    blosc.use_threads = False  # one core, as the speeds say
    print(header())
    print(f"\nOne chunk of {a.tokens:,} tokens; synthetic teacher and activations (see the docstring).\n")
    sizes, unique = {}, {}  # (row, model) -> (coded, stored); (n, model) -> mean unique ids
    rng = np.random.default_rng(a.seed)
    for model, vocab, layers, size in MODELS:
        t = Teacher(vocab, a.tokens, a.seed)
        for n in SAMPLES:
            ids, counts = t.sample(n)
            arrays = sc.encode_sampled(ids, counts, n, vocab)
            unique[n, model] = (counts > 0).sum(1).mean()
            sizes[f"sample:{n}", model] = (sum(x.nbytes for x in arrays.values()), stored(arrays.values()))
        for k in TOPKS:
            arrays = sc.encode_topk(*t.topk(k), vocab)
            sizes[f"topk:{k}", model] = (sum(x.nbytes for x in arrays.values()), stored(arrays.values()))
        h_tokens = max(1, (4 << 20) // (2 * size))  # ~4 MB float16 chunks of one layer
        h = hidden(h_tokens, size, rng)
        f16 = h.astype(np.float16)
        q, scale = quantize_int8(h)
        scale_t = a.tokens / h_tokens
        sizes["hidden float16, per layer (lz4-5)", model] = (f16.nbytes * scale_t, stored([f16], LZ4) * scale_t)
        sizes["hidden float16, per layer (zstd-3)", model] = (f16.nbytes * scale_t, stored([f16]) * scale_t)
        for name, codecs in (("lz4-5", LZ4), ("zstd-3", ZSTD)):
            sizes[f"hidden int8 + scale, per layer ({name})", model] = ((q.nbytes + scale.nbytes) * scale_t,
                                                                       stored([q, scale], codecs) * scale_t)
        sizes["hidden float16, all L+1 layers (lz4-5)", model] = tuple(
            (layers + 1) * v for v in sizes["hidden float16, per layer (lz4-5)", model])
        err = np.sqrt(((q * scale[:, None] - h) ** 2).mean(1) / (h ** 2).mean(1))
        print(f"{model}: int8 hidden states' relative RMS error per vector {err.mean():.4f} (float16: "
              f"{np.sqrt(((f16 - h) ** 2).mean(1) / (h ** 2).mean(1)).mean():.1e})")
    names = ("target", "unique ids / token (bert, Llama)") + tuple(
        f"{m} {what}" for m, *_ in MODELS for what in ("coded B/token", "stored B/token"))
    rows = []
    for key in dict.fromkeys(k for k, _ in sizes):
        n = int(key.split(":")[1]) if key.startswith("sample:") else None
        uniq = f"{unique[n, 'bert-base']:.1f}, {unique[n, 'Llama-3-8B']:.1f}" if n else ""
        rows.append((key, uniq) + tuple(f"{v / a.tokens:,.1f}" for m, *_ in MODELS for v in sizes[key, m]))
    print("\nBytes per token (logits: zstd-3 as the store's token arrays; hidden: codec named):\n")
    print(table(rows, names))
    s64 = {m: sizes["sample:64", m][1] / a.tokens for m, *_ in MODELS}
    s50 = sizes["sample:50", "Llama-3-8B"][1] / a.tokens
    print(f"\nGoal sample:64 <= 40 B/token: bert-base {s64['bert-base']:.1f}, Llama-3-8B {s64['Llama-3-8B']:.1f} "
          f"-> {'met' if max(s64.values()) <= 40 else 'NOT met'}")
    print(f"Goal at V = 128,256 below RS-KD's ~36 B/token: sample:50 {s50:.1f}, sample:64 {s64['Llama-3-8B']:.1f} "
          f"-> {'met' if max(s50, s64['Llama-3-8B']) < 36 else 'NOT met'}")

    t = Teacher(128_256, a.tokens, a.seed + 1)
    print("\nCoding alternatives at V = 128,256 (bytes per token, coded / stored with zstd-3):\n")
    print(table(alternatives(t, 64, 64), ("target", "array coding", "coded B/token", "stored B/token")))
    ids, counts = t.sample(64)
    tid, tlp = t.topk(64)
    enc_s = sc.encode_sampled(ids, counts, 64, 128_256)
    enc_t = sc.encode_topk(tid, tlp, 128_256)
    speed = [("sample:64", a.tokens / timed(lambda: sc.encode_sampled(ids, counts, 64, 128_256)),
              a.tokens / timed(lambda: sc.decode_sampled(enc_s, 64, 128_256))),
             ("topk:64", a.tokens / timed(lambda: sc.encode_topk(tid, tlp, 128_256)),
              a.tokens / timed(lambda: sc.decode_topk(enc_t, 64, 128_256)))]
    print(f"\nCodec speed at V = 128,256, one core, {a.tokens:,}-token chunks (numpy, excluding Blosc):\n")
    print(table([(name, f"{e:,.0f}", f"{d:,.0f}") for name, e, d in speed],
                ("target", "encode tokens/s", "decode tokens/s")))


if __name__ == "__main__":
    main()
