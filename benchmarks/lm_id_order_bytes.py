"""Would ordering the ids by corpus frequency make a sample:64 store smaller? Decodes the first 40 rows of a store's
train split and prices each token's sampled ids under four gap codes, in the vocabulary's own order and in the order
of the corpus's unigram counts (rank 0 = the most frequent token). One-off measurement for RESULTS.md.

    python benchmarks/lm_id_order_bytes.py   # reads /work/lm/stores40k/sample-64.zarr
"""
import numpy as np
from pkd_cache.store.reader import open_store
from pkd_cache.store.token_stream import RowCache
s = open_store("/work/lm/stores40k/sample-64.zarr")
V = s.meta.tokenizer.vocab_size
cache = RowCache(s, "train", False, 64, targets=True)  # decoded rows, no hidden states
ids_all, cnt_all, toks = [], [], []
for r in range(40):
    d = cache.get(r)
    ids_all.append(d["first"]); cnt_all.append(d["second"]); toks.append(d["tokens"])
ids = np.concatenate([np.pad(a, ((0,0),(0,64-a.shape[1]))) for a in ids_all])
cnt = np.concatenate([np.pad(a, ((0,0),(0,64-a.shape[1]))) for a in cnt_all])
T = len(ids)
m = (cnt > 0).sum(1)
print("tokens", T, "mean unique", m.mean())
freq = np.bincount(np.concatenate(toks), minlength=V)
# also frequency of sampled ids (draw-weighted) - what a dump could compute from the teacher... use corpus unigram
rank = np.empty(V, np.int64); rank[np.argsort(-freq, kind="stable")] = np.arange(V)
def rice_bits(gaps, k): return ((gaps >> k) + 1 + k).sum()
def cost(space_ids, mode):
    total = 0
    for t in range(T):
        x = np.sort(space_ids[t, :m[t]])
        g = np.diff(np.concatenate([[-1], x])) - 1
        if mode == "rice_fixed":
            k = int(np.floor(np.log2(max(1, (V - m[t]) // (m[t] + 1)))))
            total += rice_bits(g, k)
        elif mode == "rice_best":
            total += min(rice_bits(g, k) for k in range(13)) + 4
        elif mode == "gamma":
            total += (2 * np.floor(np.log2(g + 1)) + 1).sum()
        elif mode == "expgolomb2":
            v = g + 4
            total += (2 * np.floor(np.log2(v)) + 1 - 2).sum()
    return total / 8 / T
gamma_counts = sum((2*np.floor(np.log2(cnt[t,:m[t]-1]))+1).sum() for t in range(T)) / 8 / T
print("B/token: counts (gamma)", round(gamma_counts, 2), "+ n_unique 1 + ids:")
for mode in ["rice_fixed", "rice_best", "gamma", "expgolomb2"]:
    print(mode, "id order", round(cost(ids, mode), 2), "frequency order", round(cost(np.where(cnt > 0, rank[ids], 0), mode), 2))
