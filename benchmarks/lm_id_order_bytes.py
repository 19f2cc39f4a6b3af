"""How small could a sample:64 store's targets get? Decodes the first 40 rows of a store's train split and prices
each token's sampled ids and counts two ways. One-off measurement for RESULTS.md (issue 18's 40 B/token goal).

1. Codes: the ids under four gap codes, in the vocabulary's own order and in the order of the corpus's unigram
   counts (rank 0 = the most frequent token); the counts under Elias gamma (the store's code).
2. Models: the information content of the same targets under probability models, i.e. what an ideal arithmetic
   coder driven by each model would take (no such coder exists in pkd-cache):
   - ids, each id in or out of a token's set independently, with its inclusion rate (unigram, no context), or with
     its rate given the token the teacher last read (bigram: the set's context), fitted on the first half of the
     tokens and priced on the second half (held out), smoothed towards the unigram rate;
   - counts, by their empirical entropy, alone or given the token's number of distinct ids and the id's decile of
     inclusion rate (in-sample: a lower bound);
   - the number of distinct ids per token, by its entropy.

    python benchmarks/lm_id_order_bytes.py [--store /work/lm/stores40k/sample-64.zarr] [--rows 40]
"""
from __future__ import annotations

import argparse
from math import lgamma, log

import numpy as np

from pkd_cache.store.reader import open_store
from pkd_cache.store.token_stream import RowCache


def load(path: str, rows: int):
    """(ids [T, N] padded with 0, counts [T, N] padded with 0, the input token at each position [T], V, N)."""
    s = open_store(path)
    vocab, n = s.meta.tokenizer.vocab_size, int(s.meta.lm["targets"]["count"])
    cache = RowCache(s, "train", False, 64, targets=True)  # decoded rows, no hidden states
    ids, counts, tokens = [], [], []
    for r in range(rows):
        d = cache.get(r)
        ids.append(d["first"]), counts.append(d["second"]), tokens.append(d["tokens"])
    pad = lambda a: np.pad(a, ((0, 0), (0, n - a.shape[1])))  # noqa: E731
    return (np.concatenate([pad(a) for a in ids]), np.concatenate([pad(a) for a in counts]),
            np.concatenate(tokens), vocab, n)


def code_bytes(ids, m, vocab, mode) -> float:
    """Bytes per token of each token's ascending ids, gap-coded with `mode`."""
    total = 0
    for t in range(len(ids)):
        g = np.diff(np.concatenate([[-1], np.sort(ids[t, :m[t]])])) - 1
        if mode == "rice (the store's)":
            k = int(np.floor(np.log2(max(1, (vocab - m[t]) // (m[t] + 1)))))
            total += ((g >> k) + 1 + k).sum()
        elif mode == "rice, best k per token":
            total += min(((g >> k) + 1 + k).sum() for k in range(13)) + 4
        elif mode == "gamma":
            total += (2 * np.floor(np.log2(g + 1)) + 1).sum()
        elif mode == "exp-golomb 2":
            total += (2 * np.floor(np.log2(g + 4)) - 1).sum()
    return total / 8 / len(ids)


def inclusion_bytes(ids, valid, context, train, test, vocab, smoothing: float) -> float:
    """Information content (bytes per token) of the held-out tokens' id sets, each id in or out independently with
    its inclusion rate given `context` (one value per token; all zeros: no context), smoothed towards the unigram
    rate with weight `smoothing`."""
    m = valid.sum(1)
    seen = np.zeros(vocab)
    np.add.at(seen, ids[train][valid[train]], 1)
    unigram = (seen + 0.5) / (len(train) + 1)
    per_context = np.zeros((vocab, vocab), np.float32)
    np.add.at(per_context, (np.repeat(context[train], m[train]), ids[train][valid[train]]), 1)
    n_context = np.bincount(context[train], minlength=vocab).astype(float)
    q = (per_context + smoothing * unigram[None]) / (n_context[:, None] + smoothing)
    log_out, log_in = np.log2(1 - q), np.log2(q)
    at, chosen = np.repeat(context[test], m[test]), ids[test][valid[test]]
    bits = -log_out.sum(1)[context[test]].sum() - (log_in[at, chosen] - log_out[at, chosen]).sum()
    return bits / 8 / len(test)


def entropy_bytes(values, keys, tokens: int) -> float:
    """Empirical conditional entropy of `values` given `keys`, in bytes per token."""
    bits = 0.0
    _, key = np.unique(keys, return_inverse=True)
    for k in np.unique(key):
        _, f = np.unique(values[key == k], return_counts=True)
        bits -= (f * np.log2(f / f.sum())).sum()
    return bits / 8 / tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="/work/lm/stores40k/sample-64.zarr")
    p.add_argument("--rows", type=int, default=40)
    a = p.parse_args()
    ids, counts, tokens, vocab, n = load(a.store, a.rows)
    valid = counts > 0
    m = valid.sum(1)
    T = len(ids)
    print(f"{T:,} tokens, sample:{n}, V = {vocab:,}: {m.mean():.2f} distinct ids per token")

    print("\n1. codes (bytes per token)")
    freq = np.bincount(tokens, minlength=vocab)
    rank = np.empty(vocab, np.int64)
    rank[np.argsort(-freq, kind="stable")] = np.arange(vocab)
    for mode in ("rice (the store's)", "rice, best k per token", "gamma", "exp-golomb 2"):
        print(f"   ids, {mode}: id order {code_bytes(ids, m, vocab, mode):.2f}, "
              f"frequency order {code_bytes(np.where(valid, rank[ids], 0), m, vocab, mode):.2f}")
    gamma = sum((2 * np.floor(np.log2(counts[t, :m[t] - 1])) + 1).sum() for t in range(T)) / 8 / T
    print(f"   counts, gamma: {gamma:.2f}; distinct-id counts, one byte: 1")

    print("\n2. models: an ideal coder's bytes per token")
    uniform = np.mean([(lgamma(vocab + 1) - lgamma(k + 1) - lgamma(vocab - k + 1)) / log(2) / 8 for k in m])
    print(f"   ids, any set of m ids equally likely (log2 C(V, m)): {uniform:.2f}")
    order = np.arange(T)
    train, test = order[:T // 2], order[T // 2:]
    unigram = inclusion_bytes(ids, valid, np.zeros(T, np.int64), train, test, vocab, 1.0)
    print(f"   ids, unigram inclusion rates (held out): {unigram:.2f}")
    bigram = {s: inclusion_bytes(ids, valid, tokens, train, test, vocab, s) for s in (1, 4, 16, 64)}
    best = min(bigram, key=bigram.get)
    print("   ids, inclusion rates given the last token read (held out), smoothing "
          + ", ".join(f"{s}: {b:.2f}" for s, b in bigram.items()))
    rows = np.repeat(np.arange(T), m)
    stored = np.ones(valid.sum(), bool)
    stored[np.cumsum(m) - 1] = False  # a token's last count is implied by the sum
    c, mm = counts[valid][stored], m[rows][stored]
    seen = np.zeros(vocab)
    np.add.at(seen, ids[valid], 1)
    decile = np.searchsorted(np.quantile(seen[seen > 0], np.linspace(0, 1, 11)[1:-1]), seen)[ids[valid]][stored]
    h_counts = entropy_bytes(c, np.zeros(len(c)), T)
    h_counts_given = entropy_bytes(c, mm * 16 + decile, T)
    h_m = entropy_bytes(m, np.zeros(T), T)
    print(f"   counts: {h_counts:.2f}; given m and the id's inclusion decile: {h_counts_given:.2f}")
    print(f"   distinct ids per token: {h_m:.2f}")
    print(f"\n   total, unigram model: {unigram + h_counts_given + h_m:.2f}; "
          f"context model (smoothing {best}): {bigram[best] + h_counts_given + h_m:.2f} B/token")


if __name__ == "__main__":
    main()
