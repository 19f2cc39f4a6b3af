"""A token store -> token-budget batches of sequences (store/arrays/lm.py, docs/FORMAT.md version 2).

Order, a pure function of (seed, epoch) as for a store of examples (store/stream.py): the rows (chunks of C tokens)
are visited in a seeded random order, `shuffle_chunks` rows at a time; the sequences that start in a group's rows
are shuffled together and packed, in that order, into batches of at most `max_tokens` real tokens (next fit: a batch
ends where the next sequence would pass the budget; batches never span groups). Rank r of W takes batches r, r + W,
...; the last `len % W` batches of the epoch are left out on every rank. `start_batch` skips a rank's first batches
(a resumed run). Reading a group's rows together keeps the reads sequential and each row decoded once (a sequence
that runs into the next row reads that row too).

A batch (torch tensors, sequences padded on the right with id 0):
    input_ids [B, L] int64, attention_mask [B, L] int64 (1 = real token)
    sample:N  target_ids [B, L, M] int32, target_counts [B, L, M] int16 (int32 for N > 32,767; count 0 = padding
              slot)
    topk:K    target_ids [B, L, K] int32, target_logprobs [B, L, K] float32
    hidden    [B, L, h, H] float32 (with `hidden=True`: the stored layers, dequantised)
The targets at position t are the teacher's distribution of token t + 1 (student/causal_lm.TokenKD aligns them).
They are narrower than the int64 the loss indexes with: a third of the bytes to gather and to copy to a GPU (a
sample:64 batch of 4,096 tokens: 1.3 MB instead of 4 MB).
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from ..errors import PkdCacheError
from ..logit_spec import LogitSpec
from .quantize import dequantize_int8
from .token_targets import decode_row
from .worker import pool_threads, produce

if TYPE_CHECKING:
    import torch


def sequence_offsets(store, split: str) -> np.ndarray:
    """int64 [S + 1]: sequence i is tokens offsets[i]:offsets[i + 1] of the split's stream (from `seq_start`)."""
    meta = store.meta.splits[split]
    total, c = int(store.info()["splits"][split]["num_tokens"]), int(store.meta.lm["chunk_tokens"])
    flags = store.array(split, "seq_start")
    starts = np.concatenate([np.flatnonzero(flags.chunk(r)[0]) + r * c for r in range(meta.num_examples)])
    starts = starts[starts < total]
    sequences = int(store.info()["splits"][split]["num_sequences"])
    if len(starts) != sequences or (len(starts) and starts[0] != 0):
        raise PkdCacheError(f"store {store.path}: split {split} marks {len(starts):,} sequence starts (first at "
                            f"{int(starts[0]) if len(starts) else None}), its metadata says {sequences:,} from 0; "
                            f"run `pkd-cache verify {store.path}`")
    return np.append(starts, total).astype(np.int64)


def token_plan(offsets: np.ndarray, chunk_tokens: int, max_tokens: int, shuffle: bool = True, seed: int = 0,
               epoch: int = 0, shuffle_chunks: int = 8, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """The epoch's batches of rank `rank` (arrays of sequence indices), as the module docstring says."""
    if max_tokens < 1 or world < 1 or not 0 <= rank < world:
        raise PkdCacheError(f"bad token batching: max_tokens {max_tokens}, rank {rank} of {world}")
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > max_tokens:
        raise PkdCacheError(f"a sequence has {int(lengths.max()):,} tokens, more than the {max_tokens:,} tokens of a "
                            f"batch; allow at least {int(lengths.max()):,} tokens per batch")
    row_of = offsets[:-1] // chunk_tokens
    rows = int(row_of[-1]) + 1 if len(row_of) else 0
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(rows) if shuffle else np.arange(rows)
    first = np.searchsorted(row_of, np.arange(rows + 1))  # sequences starting in row r: first[r]:first[r + 1]
    batches = []
    step = max(1, shuffle_chunks) if shuffle else max(1, rows)
    for g in range(0, rows, step):
        seqs = np.concatenate([np.arange(first[r], first[r + 1]) for r in order[g:g + step]])
        if shuffle:
            seqs = seqs[rng.permutation(len(seqs))]
        cum = np.concatenate([[0], np.cumsum(lengths[seqs])])
        a = 0
        while a < len(seqs):
            b = int(np.searchsorted(cum, cum[a] + max_tokens, side="right")) - 1
            batches.append(seqs[a:b])
            a = b
    keep = len(batches) - len(batches) % world
    return batches[rank:keep:world]


class RowCache:
    """Decoded rows of one split, the most recent few kept: a group's rows are read once. With a thread `pool`,
    `ahead(rows)` decodes rows there before they are asked for (the C decoder and Blosc release the GIL, so several
    rows decode at once beside the training loop); `get` waits for such a row, else decodes it itself."""

    def __init__(self, store, split: str, hidden: bool, size: int, targets: bool = True,
                 pool: Optional[ThreadPoolExecutor] = None):
        self.store, self.split, self.size, self.pool = store, split, size, pool
        self.pending: dict[int, Future] = {}
        lm = store.meta.lm
        self.c, self.vocab = int(lm["chunk_tokens"]), store.meta.tokenizer.vocab_size
        stored = lm["targets"]
        self.spec = LogitSpec(stored["kind"], int(stored.get("count") or 0)) if targets else LogitSpec("none")
        self.total = int(store.info()["splits"][split]["num_tokens"])
        names = ["tokens"] + (["targets", "target_bytes"] if self.spec.kind != "none" else [])
        self.hidden = hidden and bool(lm["hidden_layers"])
        if hidden and not lm["hidden_layers"]:
            raise PkdCacheError(f"store {store.path} holds no hidden states (dump it with --hidden-layers)")
        names += ["hidden"] + (["hidden_scale"] if store.meta.cls_dtype == "int8" else []) if self.hidden else []
        self.arrays = {n: store.array(split, n) for n in names}
        self.rows: OrderedDict[int, dict] = OrderedDict()

    def ahead(self, rows) -> None:
        """Start decoding `rows` on the pool (those not decoded or under way already); nothing without a pool."""
        for r in rows if self.pool is not None else ():
            if r not in self.rows and r not in self.pending:
                self.pending[r] = self.pool.submit(self._decode, r)

    def get(self, r: int) -> dict[str, np.ndarray]:
        if r in self.rows:
            self.rows.move_to_end(r)
            return self.rows[r]
        future = self.pending.pop(r, None)
        row = future.result() if future is not None else self._decode(r)
        self.rows[r] = row
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        return row

    def _decode(self, r: int) -> dict[str, np.ndarray]:
        t = min(self.c, self.total - r * self.c)
        raw = {n: a.chunk(r)[0] for n, a in self.arrays.items()}
        row = {"tokens": raw["tokens"][:t].astype(np.int64)}
        if self.spec.kind != "none":
            try:
                row["first"], row["second"] = decode_row(self.spec, raw["targets"], raw["target_bytes"], t,
                                                         self.vocab)
            except ValueError as e:
                raise PkdCacheError(f"store {self.store.path}: {self.split}/targets row {r}: {e}; run "
                                    f"`pkd-cache verify {self.store.path}`") from None
        if self.hidden:
            h = raw["hidden"][:, :t]
            if "hidden_scale" in raw:
                h = dequantize_int8(h, raw["hidden_scale"][:, :t], np.float32)
            row["hidden"] = h.transpose(1, 0, 2).astype(np.float32, copy=False)  # [t, h, H]
        return row


def gather_batch(cache: RowCache, offsets: np.ndarray, seqs: np.ndarray) -> dict[str, np.ndarray]:
    """The sequences `seqs` as padded numpy arrays (the keys of the module docstring), copied row by row straight
    from the decoded rows into the batch (no row is copied whole)."""
    c = cache.c
    lengths = offsets[seqs + 1] - offsets[seqs]
    width = int(lengths.max())
    real = np.arange(width)[None, :] < lengths[:, None]
    tokens = (offsets[seqs][:, None] + np.arange(width)[None, :])[real]  # global token index of each real position
    dest = np.flatnonzero(real.reshape(-1))  # where each real position goes in the flattened [B * L] batch
    row_of, local = tokens // c, tokens % c
    picks = [(d, np.flatnonzero(row_of == r)) for r in np.unique(row_of) for d in (cache.get(int(r)),)]
    flat = real.size
    out = {"input_ids": np.zeros(flat, np.int64), "attention_mask": real.astype(np.int64)}
    names = {"first": "target_ids", "second": "target_counts" if cache.spec.kind == "sample" else "target_logprobs"}
    if cache.spec.kind != "none":
        m = max(d["first"].shape[1] for d, _ in picks)
        narrow = {"first": np.int32, "second": np.int16 if cache.spec.count <= 0x7FFF else np.int32} \
            if cache.spec.kind == "sample" else {"first": np.int32, "second": np.float32}
        for key, name in names.items():
            out[name] = np.zeros((flat, m), narrow[key])
    if cache.hidden:
        out["hidden"] = np.zeros((flat,) + picks[0][0]["hidden"].shape[1:], np.float32)
    for d, at in picks:
        src, dst = local[at], dest[at]
        out["input_ids"][dst] = d["tokens"][src]
        if cache.spec.kind != "none":
            w = d["first"].shape[1]
            out["target_ids"][dst, :w] = d["first"][src]
            out[names["second"]][dst, :w] = d["second"][src]
        if cache.hidden:
            out["hidden"][dst] = d["hidden"][src]
    return {k: v if k == "attention_mask" else v.reshape(real.shape + v.shape[1:]) for k, v in out.items()}


def batch_rows(offsets: np.ndarray, seqs: np.ndarray, chunk_tokens: int) -> list[int]:
    """The rows (chunks of `chunk_tokens` tokens) that the sequences `seqs` lie in, ascending."""
    first, last = offsets[seqs] // chunk_tokens, (offsets[seqs + 1] - 1) // chunk_tokens
    return sorted({int(r) for f, e in zip(first, last) for r in range(f, e + 1)})


def _gathered(cache: RowCache, offsets: np.ndarray, plan: list[np.ndarray], ahead: int) -> Iterator[dict]:
    """gather_batch over the plan, the rows of the next `ahead` batches decoding on the cache's pool meanwhile."""
    rows = [batch_rows(offsets, seqs, cache.c) for seqs in plan[:ahead]]
    for i, seqs in enumerate(plan):
        if i + ahead < len(plan):
            rows.append(batch_rows(offsets, plan[i + ahead], cache.c))
        for later in rows[i:]:
            cache.ahead(later)
        yield gather_batch(cache, offsets, seqs)


def iter_token_batches(store, split: str, max_tokens: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                       shuffle_chunks: int = 8, start_batch: int = 0, shard: tuple[int, int] = (0, 1),
                       hidden: bool = False, prefetch: int = 2, targets: bool = True,
                       workers: Optional[int] = None) -> Iterator[dict[str, "torch.Tensor"]]:
    """The epoch's batches (torch tensors), gathered `prefetch` batches ahead on a thread, from rows decoded on
    `workers` threads (default: up to 4; 0: on that thread) for the next few batches; `targets` False leaves the
    coded targets unread (a CE-only student)."""
    import torch

    offsets = sequence_offsets(store, split)
    c = int(store.meta.lm["chunk_tokens"])
    plan = token_plan(offsets, c, max_tokens, shuffle, seed, epoch, shuffle_chunks, *shard)[start_batch:]
    threads = pool_threads(workers)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pkd-cache-rows") if threads > 0 else None
    cache = RowCache(store, split, hidden, size=max(1, shuffle_chunks) + 2, targets=targets, pool=pool)
    try:
        for arrays in produce(_gathered(cache, offsets, plan, threads), prefetch, "pkd-cache-tokens"):
            yield {k: torch.from_numpy(v) for k, v in arrays.items()}
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def steps_per_epoch(store, split: str, max_tokens: int, world: int = 1) -> int:
    """The batches each rank takes in an epoch (the same for every seed: the plan's batch count is not)."""
    offsets = sequence_offsets(store, split)
    return len(token_plan(offsets, int(store.meta.lm["chunk_tokens"]), max_tokens, True, 0, 0, 8, 0, world))
