"""`dump --task lm`'s inner loop: the teacher over batches of sequences, its per-token outputs cut into rows of the
token store (store/arrays/lm.py), each row coded and written on a background thread (or between teacher batches
when the teacher keeps every CPU core busy: commands/dump_lm.py's `_cores_busy`).

Resume is byte-identical: the teacher batches are a fixed plan over the sequences (`batch_size` at a time, in
order), a batch is re-run whole when any row it touches is not durable, and sample:N's draws depend only on the
seed, the token's index in the corpus and its logits (teacher/token_targets.py), never on batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..logit_spec import LogitSpec
from ..store.quantize import quantize_int8
from ..store.token_targets import encode_row
from ..student.sparse_kd import topk_targets
from ..teacher.lm_head import SplitHead, block_rows
from ..teacher.run import autocast
from ..teacher.token_targets import seeded_sample_targets


@dataclass(frozen=True)
class RowSpec:
    """What every row of a token store holds, and how it is coded."""

    chunk_tokens: int
    spec: LogitSpec
    vocab: int
    slot: int
    hidden_layers: tuple[int, ...]
    hidden_dtype: str  # float16 | float32 | int8
    id_dtype: str
    seed: int
    temperature: float


def teacher_batches(offsets: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """[(first sequence, end sequence)] of every teacher forward: `batch_size` sequences at a time, in order."""
    n = len(offsets) - 1
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


@torch.no_grad()
def teacher_outputs(model, ids: np.ndarray, offsets: np.ndarray, batch: tuple[int, int], rows: RowSpec, device,
                    precision: str = "fp32", split: Optional[SplitHead] = None) -> dict[str, np.ndarray]:
    """The teacher's per-token outputs of the sequences of `batch`, flat in corpus order: tokens [t], seq_start [t],
    the targets' two arrays (`first`, `second`: sample ids and counts, or top-k ids and log-probs) and `hidden`
    [t, h, H] (float32 for int8 storage, quantised by the writer). With `split` (teacher/lm_head.py) the logits are
    made and read a block of positions at a time; the outputs are the same."""
    a, b = batch
    t0, t1 = int(offsets[a]), int(offsets[b])
    lengths = np.diff(offsets[a:b + 1])
    width = int(lengths.max())
    x = np.zeros((b - a, width), np.int64)
    real = np.arange(width)[None, :] < lengths[:, None]
    x[real] = ids[t0:t1]
    inputs = torch.from_numpy(x).to(device)
    mask = torch.from_numpy(real.astype(np.int64)).to(device)
    targets = rows.spec.kind != "none"
    split = split if targets else None
    with autocast(inputs.device, precision):
        out = (split.body if split is not None else model)(input_ids=inputs, attention_mask=mask,
                                                           output_hidden_states=bool(rows.hidden_layers))
    keep = mask.bool()
    packed = bool(keep.all())  # every position real (packed sequences): the outputs' rows are views, not copies
    result = {"tokens": ids[t0:t1], "seq_start": np.zeros(t1 - t0, np.uint8)}
    result["seq_start"][offsets[a:b] - t0] = 1
    if split is not None:  # [t, H] -> the head's logits [rows, V] and their targets, a block at a time
        last = out.last_hidden_state
        flat = last.reshape(-1, last.shape[-1]) if packed else last[keep]
        step = block_rows(rows.vocab, inputs.device)
        parts = []
        for i in range(0, len(flat), step):
            with autocast(inputs.device, precision):
                logits = split.head(flat[i:i + step])
            parts.append(_targets(logits.float(), rows, t0 + i))
        result["first"], result["second"] = (_cat([p[k] for p in parts]) for k in (0, 1))
    elif targets:
        # [t, V], the flat order of the tokens (row-major over the batch)
        logits = (out.logits.reshape(-1, out.logits.shape[-1]) if packed else out.logits[keep]).float()
        result["first"], result["second"] = _targets(logits, rows, t0)
    if rows.hidden_layers:
        stacked = torch.stack([out.hidden_states[i][keep] for i in rows.hidden_layers], 1)  # [t, h, H]
        result["hidden"] = stacked.float().cpu().numpy() if rows.hidden_dtype != "float16" else \
            stacked.to(torch.float16).cpu().numpy()
    return result


def _targets(logits: torch.Tensor, rows: RowSpec, first_token: int) -> tuple[np.ndarray, np.ndarray]:
    """The sparse targets of float logits [t, V] whose first row is the corpus's token `first_token`."""
    if rows.spec.kind == "sample":
        first, second = seeded_sample_targets(logits, rows.spec.count, rows.seed, first_token, rows.temperature)
    else:
        first, second = topk_targets(logits, rows.spec.count, rows.temperature)
    return first.cpu().numpy(), second.cpu().numpy()  # counts stay int64


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate [t_i, M_i] arrays along t, padding each to the widest M with zeros (sample ids and counts)."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim == 2:
        m = max(p.shape[1] for p in parts)
        parts = [np.pad(p, ((0, 0), (0, m - p.shape[1]))) if p.shape[1] < m else p for p in parts]
    return np.concatenate(parts)


class RowAssembler:
    """Per-token outputs, added batch by batch in corpus order, handed out as whole rows of C tokens.

    After `skip_to` (a batch whose rows are all durable was not run) the next batch may start inside a row: that
    row is durable too (the skipped batch touched it), so its tokens are dropped up to the next row boundary."""

    def __init__(self, chunk_tokens: int):
        self.c, self.pos, self.parts = chunk_tokens, 0, []

    def skip_to(self, token: int) -> None:
        self.parts, self.pos = [], token

    def add(self, start: int, outputs: dict[str, np.ndarray]) -> None:
        if not self.parts:
            self.pos = start
            cut = -start % self.c  # inside a durable row: drop up to its end
            if cut:
                outputs = {k: v[cut:] for k, v in outputs.items()}
                self.pos += cut
        self.parts.append(outputs)

    def _held(self) -> int:
        return sum(len(p["tokens"]) for p in self.parts)

    def rows(self, final: bool = False):
        """(row index, {name: that row's per-token arrays}) of every whole row held (and the last part one when
        `final`)."""
        while self.parts and (self._held() >= self.c or final):
            merged = {k: _cat([p[k] for p in self.parts]) for k in self.parts[0]}
            n = min(self.c, len(merged["tokens"]))
            if n == 0:
                break
            row = {k: v[:n] for k, v in merged.items()}
            rest = {k: v[n:] for k, v in merged.items()}
            self.parts = [rest] if len(rest["tokens"]) else []
            yield self.pos // self.c, row
            self.pos += n


def encode(rows: RowSpec, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row's per-token arrays -> the store's arrays of that row (each [1, ...], padded to C tokens)."""
    c, t = rows.chunk_tokens, len(row["tokens"])
    out = {"tokens": np.zeros((1, c), rows.id_dtype), "seq_start": np.zeros((1, c), np.uint8)}
    out["tokens"][0, :t], out["seq_start"][0, :t] = row["tokens"], row["seq_start"]
    if rows.spec.kind != "none":
        blob, sizes = encode_row(rows.spec, row["first"], row["second"], rows.vocab, rows.slot)
        out["targets"], out["target_bytes"] = blob[None], sizes[None]
    if rows.hidden_layers:
        h = np.zeros((len(rows.hidden_layers), c, row["hidden"].shape[-1]), np.float32 if
                     rows.hidden_dtype == "int8" else rows.hidden_dtype)
        h[:, :t] = row["hidden"].transpose(1, 0, 2)
        if rows.hidden_dtype == "int8":
            q, scale = quantize_int8(h)
            out["hidden"], out["hidden_scale"] = q[None], scale[None]
        else:
            out["hidden"] = h[None]
    return out


def rows_of(start: int, stop: int, chunk_tokens: int) -> range:
    """The rows that tokens [start, stop) fall in."""
    return range(start // chunk_tokens, (stop - 1) // chunk_tokens + 1) if stop > start else range(0)


def needs_run(batch_rows: range, durable: set) -> bool:
    """Whether a teacher batch touching `batch_rows` must run: some row of it is not durable."""
    return any(r not in durable for r in batch_rows)
