"""The arrays of a token store (format version 2, `dump --task lm`; docs/FORMAT.md): the token stream of a corpus
cut into rows of C = `lm.chunk_tokens` tokens, one row per chunk, so that every array is chunked along rows like a
format-1 store's examples and the same writer, checksums, resume and reader machinery hold. Only the last row has
positions past the corpus's last token (zero, as any partial edge chunk of a Zarr array is filled); `num_tokens`
says where the stream ends.

    tokens        R x C        uint8/16/32   token ids, packed as tightly as the vocabulary allows (`lm.id_dtype`)
    seq_start     R x C        uint8         1 at the first token of each sequence: offsets = flatnonzero + [T]
    targets       R x slot     uint8         the row's sparse teacher targets, coded (store/token_targets.py); zero
                                             after its `target_bytes` (compressed away)
    target_bytes  R x P        int64         bytes of each of the row's P coded streams, back to back in `targets`
    hidden        R x h x C x H  float16 | int8 | float32: the teacher's per-token hidden states of the h layers
                                 `lm.hidden_layers` (0 = embeddings), one layer per chunk
    hidden_scale  R x h x C    float32       only with int8 `hidden`: hidden ≈ hidden * hidden_scale[..., None]
"""
from __future__ import annotations

from .kind import ArrayKind, Dims, below, unsigned_max


def _rows(d: Dims) -> tuple[int, int]:
    return (d.n, d.chunk_tokens)


def _vocab(v, meta):
    return below(v, meta.tokenizer.vocab_size, "token ids")


def _flag(v, meta):
    return "holds sequence-start flags other than 0/1" if unsigned_max(v) > 1 else None


def _byte_counts(v, meta):
    slot = int(meta.raw["lm"]["target_slot"])
    if unsigned_max(v) > slot or (len(v) and int(v.sum(axis=1).max()) > slot):
        return f"holds coded target sizes outside the row's {slot:,} bytes"
    return None


def _targets(d: Dims) -> bool:
    return d.target_slot > 0


def _hidden(d: Dims) -> bool:
    return d.hidden_layers > 0


def _hidden_int8(d: Dims) -> bool:
    return d.hidden_layers > 0 and d.cls_dtype == "int8"


KINDS = (
    ArrayKind("tokens", 20, _rows, lambda d: d.id_dtype, check=_vocab, layout="tokens"),
    ArrayKind("seq_start", 21, _rows, "uint8", check=_flag, layout="tokens"),
    ArrayKind("targets", 22, lambda d: (d.n, d.target_slot), "uint8", present=_targets, layout="tokens"),
    ArrayKind("target_bytes", 23, lambda d: (d.n, d.target_parts), "int64", present=_targets, check=_byte_counts,
              layout="tokens"),
    ArrayKind("hidden", 24, lambda d: (d.n, d.hidden_layers, d.chunk_tokens, d.hidden), lambda d: d.cls_dtype,
              present=_hidden, layer_axis=True, per_layer=True, codec="lz4", layout="tokens"),
    ArrayKind("hidden_scale", 25, lambda d: (d.n, d.hidden_layers, d.chunk_tokens), "float32", present=_hidden_int8,
              layer_axis=True, companion=True, layout="tokens"),
)
