"""The [CLS] hidden state of every teacher layer, N x (L+1) x H: index 0 is the embedding output, index i the output
of encoder layer i. Stored one layer per chunk, so a student decodes only the layers its map names, and compressed
with lz4, since every training step reads it (store/format.py `compressor`). With `--dtype int8`, each row of each
layer has a float32 scale: cls ≈ cls * cls_scale[..., None] (store/quantize.py)."""
from __future__ import annotations

from .kind import ArrayKind, Dims


def _int8(d: Dims) -> bool:
    return d.cls_dtype == "int8"


KINDS = (
    ArrayKind("cls", 5, lambda d: (d.n, d.layers + 1, d.hidden), lambda d: d.cls_dtype, layer_axis=True,
              per_layer=True, codec="lz4"),
    ArrayKind("cls_scale", 6, lambda d: (d.n, d.layers + 1), "float32", present=_int8, layer_axis=True,
              companion=True),
)
