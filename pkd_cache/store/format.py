"""The store layout, version 1 (docs/FORMAT.md is the normative description).

    <store>/zarr.json                 root group; attributes = the metadata below
    <store>/<split>/zarr.json         one group per split ("train", "validation", ...)
    <store>/<split>/<array>/...       arrays chunked along N (examples), compressed with Blosc/zstd

Arrays per split (N examples, S = max_seq_length, C labels, L teacher layers, H hidden size):
    input_ids       N x S        int32    token ids, padded with the tokenizer's pad id to S
    attention_mask  N x S        uint8    1 for real tokens
    token_type_ids  N x S        uint8    segment ids
    labels          N            int64    class ids (float32 scores for regression tasks)
    logits          N x C        float32  teacher logits
    cls             N x (L+1) x H  float16 (default), float32 or int8: [CLS] hidden state; index 0 = embedding
                                   output, index i = output of encoder layer i
    cls_scale       N x (L+1)    float32  only with int8 `cls`: cls ≈ cls * cls_scale[..., None]
"""
from __future__ import annotations

import json
from typing import Optional

FORMAT_NAME = "pkd-cache"
FORMAT_VERSION = 1
TOKEN_ARRAYS = ("input_ids", "attention_mask", "token_type_ids")
TOKEN_DTYPES = {"input_ids": "int32", "attention_mask": "uint8", "token_type_ids": "uint8"}  # as stored
ARRAYS = TOKEN_ARRAYS + ("labels", "logits", "cls")
CLS_DTYPES = ("float16", "float32", "int8")  # int8: plus `cls_scale` (N x (L+1) float32)
STORE_FORMATS = ("zarr", "arrow")
ARROW_META = "pkd_cache.json"  # the metadata of an Arrow store (a Zarr store's is the attributes of its zarr.json)


def read_metadata(location) -> Optional[dict]:
    """The metadata of the store at `location` (Zarr or Arrow flavour), None if there is no store there.

    Here rather than in the writer: `ls` and `serve` call it, and this module imports neither numpy nor zarr."""
    for key, inner in (("zarr.json", "attributes"), (ARROW_META, None)):
        try:
            meta = json.loads(location.read(key))
        except (OSError, ValueError):
            continue
        meta = meta.get(inner, {}) if inner else meta
        if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME:
            return meta
    return None


def compressor(name: str, dtype_size: int):
    """Blosc; byte shuffle for multi-byte types (groups the exponent bytes of floats together).

    CLS vectors are most of a store and are read on every student step: lz4 (clevel 5). Measured on real
    MiniLM-L6 activations (float16) it reads 2.5x and writes 3.5x faster than zstd-3 for 13% more bytes
    (ratio 0.84 vs 0.74; benchmarks/RESULTS.md). Everything else, mostly padding and small ids, compresses far
    better with zstd-3 and is a small share of the reading.
    """
    from zarr.codecs import BloscCodec

    shuffle = "shuffle" if dtype_size > 1 else "noshuffle"
    if name == "cls":
        return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


def split_arrays(n: int, seq_len: int, num_labels: int, layers: int, hidden: int, cls_dtype: str,
                 label_dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array: (shape, dtype)} of one split of N examples."""
    shapes = {"input_ids": ((n, seq_len), "int32"), "attention_mask": ((n, seq_len), "uint8"),
              "token_type_ids": ((n, seq_len), "uint8"), "labels": ((n,), label_dtype),
              "logits": ((n, num_labels), "float32"), "cls": ((n, layers + 1, hidden), cls_dtype)}
    if cls_dtype == "int8":
        shapes["cls_scale"] = ((n, layers + 1), "float32")
    return shapes


def expected_arrays(meta: dict) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """{split: {array: (shape, dtype)}} that the metadata promises; KeyError/TypeError/ValueError if malformed."""
    layers, hidden = int(meta["teacher"]["num_layers"]), int(meta["teacher"]["hidden_size"])
    seq, labels = int(meta["max_seq_length"]), int(meta["task"]["num_labels"])
    label_dtype = "float32" if meta["task"].get("is_regression") else "int64"
    return {s: split_arrays(int(v["num_examples"]), seq, labels, layers, hidden, str(meta["cls_dtype"]), label_dtype)
            for s, v in meta["splits"].items()}
