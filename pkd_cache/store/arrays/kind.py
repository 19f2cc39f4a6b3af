"""What an array kind is: its shape, dtype and storage in a split, and the values a dump can have written."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

if TYPE_CHECKING:
    import numpy as np

    from ..format import StoreMeta

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """What sizes one split's arrays: its example count and the store's settings."""

    n: int  # examples
    seq_len: int  # max_seq_length
    num_labels: int
    layers: int  # teacher layers (the [CLS] arrays hold layers + 1: index 0 is the embedding output)
    hidden: int
    cls_dtype: str
    label_dtype: str  # int64, or float32 for a regression task
    extras: tuple[str, ...] = ()  # the optional arrays the store holds (its metadata's `extra_arrays`)
    layout: str = "examples"  # "examples" (format 1: one row per example) or "tokens" (format 2, arrays/lm.py)
    chunk_tokens: int = 0  # tokens: tokens per row (one row = one chunk of the token stream)
    hidden_layers: int = 0  # tokens: how many teacher layers' per-token hidden states are stored
    target_slot: int = 0  # tokens: bytes per row of the coded sparse targets (0: none stored)
    target_parts: int = 0  # tokens: how many byte streams the coded targets of a row are
    id_dtype: str = "uint32"  # tokens: the smallest unsigned type of the vocabulary


def _always(_: Dims) -> bool:
    return True


@dataclass(frozen=True)
class ArrayKind:
    """One array of every split (docs/FORMAT.md). A module in store/arrays/ lists its kinds in `KINDS`; the store
    lays them out, compresses, reads and checks them from this description alone."""

    name: str
    order: int  # position among the arrays (the order they are listed, written and read)
    shape: Callable[[Dims], Shape]  # N first: every array is chunked along the examples
    dtype: Union[str, Callable[[Dims], str]]
    present: Callable[[Dims], bool] = _always  # whether a split of these settings holds it
    token: bool = False  # N x S, one value per token: the stream trims it with the padding and reads it as int64
    layer_axis: bool = False  # axis 1 is the teacher layer (0 = embeddings): a student's layer map selects from it
    per_layer: bool = False  # stored one layer per chunk (Zarr) or column (Arrow), so a reader decodes only its layers
    codec: str = "zstd"  # the Blosc compressor: lz4 for what every training step reads, zstd for the rest
    companion: bool = False  # read only along with another array (int8 [CLS]'s scales): not in format.ARRAYS
    in_batches: bool = True  # read into training batches by default (format.ARRAYS); False for bookkeeping
    check: Optional[Callable[[np.ndarray, StoreMeta], Optional[str]]] = None  # why values are impossible, or None
    # computed by the writer from a chunk's other arrays ({name: rows}), when the dump does not hand it over
    derive: Optional[Callable[[dict[str, np.ndarray]], np.ndarray]] = None
    layout: str = "examples"  # the store layout it belongs to (Dims.layout)

    def dtype_of(self, dims: Dims) -> str:
        return self.dtype(dims) if callable(self.dtype) else self.dtype


def unsigned_max(v: np.ndarray) -> int:
    """max(v) read as unsigned: a negative value becomes huge, so one `< bound` test checks both ends."""
    import numpy as np

    return int(np.ascontiguousarray(v).reshape(-1).view(f"u{v.dtype.itemsize}").max())


def outlier(v: np.ndarray) -> int:
    """A value to quote in a message: the most negative if any is negative, else the largest."""
    return int(v.min()) if v.min() < 0 else int(v.max())


def below(v: np.ndarray, bound: int, what: str) -> Optional[str]:
    """The message for integer values outside [0, bound), or None (one max pass over their bits)."""
    return f"holds {what} outside [0, {bound}) (e.g. {outlier(v)})" if unsigned_max(v) >= bound else None
