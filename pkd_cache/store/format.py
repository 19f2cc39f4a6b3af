"""The store layout, version 1 (docs/FORMAT.md is the normative description).

    <store>/zarr.json                 root group; attributes = the metadata below
    <store>/<split>/zarr.json         one group per split ("train", "validation", ...)
    <store>/<split>/<array>/...       arrays chunked along N (examples), compressed with Blosc/zstd

Arrays per split (N examples, S = max_seq_length, C labels, L teacher layers, H hidden size), each declared by a
module of store/arrays/ (its shape, dtype, storage and value checks):
    input_ids       N x S        int32    token ids, padded with the tokenizer's pad id to S
    attention_mask  N x S        uint8    1 for real tokens
    token_type_ids  N x S        uint8    segment ids
    labels          N            int64    class ids (float32 scores for regression tasks)
    logits          N x C        float32  teacher logits
    cls             N x (L+1) x H  float16 (default), float32 or int8: [CLS] hidden state; index 0 = embedding
                                   output, index i = output of encoder layer i
    cls_scale       N x (L+1)    float32  only with int8 `cls`: cls ≈ cls * cls_scale[..., None]

The metadata is a JSON object (`StoreMeta` below reads it once it has been checked, store/trust.py).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional

from ..config import CLS_DTYPES  # noqa: F401 - defined with the dump settings that choose it
from .arrays import BY_NAME, KINDS, Dims

FORMAT_NAME = "pkd-cache"
FORMAT_VERSION = 1  # what a store of examples (sentence-level) is written as: unchanged since 0.1
TOKEN_FORMAT_VERSION = 2  # a token store (`dump --task lm`, store/arrays/lm.py): `layout: tokens`
READ_VERSION = TOKEN_FORMAT_VERSION  # the newest format this pkd-cache reads
LAYOUTS = {"examples": FORMAT_VERSION, "tokens": TOKEN_FORMAT_VERSION}  # layout -> its format version
# the array kinds (store/arrays/, one module each): names by role
_EXAMPLE_KINDS = tuple(k for k in KINDS if k.layout == "examples")
TOKEN_ARRAYS = tuple(k.name for k in _EXAMPLE_KINDS if k.token)
TOKEN_DTYPES = {k.name: k.dtype for k in _EXAMPLE_KINDS if k.token}  # as stored
ARRAYS = tuple(k.name for k in _EXAMPLE_KINDS if not k.companion and k.in_batches)  # what a batch holds by default
JOURNAL = ".pkd_cache"  # an unfinished store's progress records and writer lock (store/integrity.py, journal.py)

# `cls` is stored one layer per chunk (Zarr) or per column (Arrow): a student reads only the layers its map names.
# The kinds say which arrays (`per_layer`); the helpers below are the only place that knows what it means.
LAYER_AXIS_ARRAYS = tuple(k.name for k in KINDS if k.layer_axis)  # axis 1 is the layer (0 = embeddings): `layers`
# selects


def is_layered(name: str) -> bool:
    """Whether array `name` is stored one layer per chunk / column."""
    kind = BY_NAME.get(name)
    return kind is not None and kind.per_layer


def layer_part(name: str, layer: int) -> str:
    """What holds layer `layer` of array `name` in an Arrow shard: `cls_3` for a layered array, else the name."""
    return f"{name}_{layer}" if is_layered(name) else name


def layer_parts(name: str, width: int) -> list[str]:
    """Every column holding array `name`, whose axis 1 is `width` long."""
    return [layer_part(name, i) for i in range(width)] if is_layered(name) else [name]


def part_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one row of one part (layer column) of array `name` of `shape`."""
    return tuple(shape[2:]) if is_layered(name) else tuple(shape[1:])


def chunk_shape(name: str, shape: tuple[int, ...], chunk_size: int) -> tuple[int, ...]:
    """The chunk shape pkd-cache writes: `chunk_size` rows, whole along every other axis but a layered array's
    layer axis (one layer per chunk)."""
    rows = min(chunk_size, shape[0])
    return (rows, 1) + tuple(shape[2:]) if is_layered(name) else (rows,) + tuple(shape[1:])


def compressor(name: str, dtype_size: int):
    """Blosc; byte shuffle for multi-byte types (groups the exponent bytes of floats together).

    CLS vectors are most of a store and are read on every student step: lz4 (clevel 5). Measured on real
    MiniLM-L6 activations (float16) it reads 2.5x and writes 3.5x faster than zstd-3 for 13% more bytes
    (ratio 0.84 vs 0.74; benchmarks/RESULTS.md). Everything else, mostly padding and small ids, compresses far
    better with zstd-3 and is a small share of the reading.
    """
    from zarr.codecs import BloscCodec

    shuffle = "shuffle" if dtype_size > 1 else "noshuffle"
    kind = BY_NAME.get(name)
    if kind is not None and kind.codec == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


def split_arrays(n: int, seq_len: int, num_labels: int, layers: int, hidden: int, cls_dtype: str,
                 label_dtype: str, extras: tuple[str, ...] = (),
                 lm: Optional[dict] = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array: (shape, dtype)} of one split of N rows (examples; token chunks for a token store, whose metadata's
    `lm` entry is `lm`): every kind of store/arrays/ it holds."""
    tokens = {} if lm is None else {
        "layout": "tokens", "chunk_tokens": lm["chunk_tokens"], "hidden_layers": len(lm["hidden_layers"]),
        "target_slot": lm["target_slot"], "target_parts": lm["target_parts"], "id_dtype": lm["id_dtype"]}
    d = Dims(n, seq_len, num_labels, layers, hidden, cls_dtype, label_dtype, tuple(extras), **tokens)
    return {k.name: (tuple(k.shape(d)), k.dtype_of(d)) for k in KINDS if k.layout == d.layout and k.present(d)}


def with_derived(chunk: dict, holds) -> dict:
    """`chunk` ({array: rows}) plus each array of `holds` (the names its split holds) that a kind derives from the
    others (`ArrayKind.derive`) and the chunk lacks."""
    for kind in KINDS:
        if kind.derive is not None and kind.name in holds and kind.name not in chunk:
            chunk[kind.name] = kind.derive(chunk)
    return chunk


def now() -> str:
    """A timestamp as the metadata records it (UTC, seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_metadata(metadata: dict, store_format: str, package_version: str) -> dict:
    """The metadata a new store starts with (`complete` false until the writer's last write): the one place the
    format's own entries are written; `metadata` adds the dump's (teacher, task, tokenizer, settings, ...; a token
    store's `layout: tokens` and `lm` entry, which make it format version 2)."""
    version = LAYOUTS[metadata.get("layout", "examples")]
    return {"format": FORMAT_NAME, "format_version": version, "complete": False,
            "package_version": package_version, "created_at": now(), "created_by": created_by(),
            "store_format": store_format, **metadata, "splits": {}}


def created_by() -> str:
    """Who made a store, as `ls` shows it: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _str(value) -> Optional[str]:
    """A recorded name or path: a string, or None for anything else (nothing downstream trusts another type)."""
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TeacherMeta:
    num_layers: int
    hidden_size: int
    name_or_path: Optional[str] = None
    base_model: Optional[str] = None
    weights_fingerprint: Optional[str] = None
    resolved: Optional[str] = None  # the hub name or folder the teacher was loaded from
    finetuned_by_dump: Optional[str] = None  # the folder dump fine-tuned the teacher into, if it did
    config: dict = field(default_factory=dict)  # the teacher's model config entries a reader checks values with


@dataclass(frozen=True)
class TaskMeta:
    num_labels: int
    is_regression: bool
    name: Optional[str] = None
    label_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenizerMeta:
    vocab_size: int
    name_or_path: Optional[str] = None
    vocab_fingerprint: Optional[str] = None


@dataclass(frozen=True)
class SplitMeta:
    num_examples: int
    source: Optional[str] = None
    data_fingerprint: Optional[str] = None


@dataclass(frozen=True)
class StoreMeta:
    """A store's metadata, typed. Built by `from_dict` only after `trust.meta_problems` found nothing wrong with the
    entries that size the arrays, so every field here has the type it says. `raw` is the dict as stored (entries
    this class does not name, such as `settings` or `resumptions`, are read from it)."""

    format_version: int
    complete: bool
    chunk_size: int
    max_seq_length: int
    cls_dtype: str
    teacher: TeacherMeta
    task: TaskMeta
    tokenizer: TokenizerMeta
    splits: dict[str, SplitMeta]
    store_format: str = "zarr"
    cache_key: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, meta: dict) -> "StoreMeta":
        """The one place a store's metadata dict is read into fields (after `trust.meta_problems`)."""
        t, k, tok = meta["teacher"], meta["task"], meta["tokenizer"]
        config = t.get("config")
        return cls(
            format_version=int(meta["format_version"]), complete=bool(meta.get("complete")),
            chunk_size=int(meta["chunk_size"]), max_seq_length=int(meta["max_seq_length"]),
            cls_dtype=str(meta["cls_dtype"]), store_format=str(meta.get("store_format") or "zarr"),
            cache_key=_str(meta.get("cache_key")),
            teacher=TeacherMeta(num_layers=int(t["num_layers"]), hidden_size=int(t["hidden_size"]),
                                name_or_path=t.get("name_or_path"), base_model=t.get("base_model"),
                                weights_fingerprint=_str(t.get("weights_fingerprint")), resolved=_str(t.get("resolved")),
                                finetuned_by_dump=_str(t.get("finetuned_by_dump")),
                                config=dict(config) if isinstance(config, dict) else {}),
            task=TaskMeta(num_labels=int(k["num_labels"]), is_regression=bool(k["is_regression"]), name=k.get("name"),
                          label_names=tuple(k.get("label_names") or ())),
            tokenizer=TokenizerMeta(vocab_size=int(tok["vocab_size"]), name_or_path=tok.get("name_or_path"),
                                    vocab_fingerprint=tok.get("vocab_fingerprint")),
            splits={name: SplitMeta(num_examples=int(s["num_examples"]), source=s.get("source"),
                                    data_fingerprint=s.get("data_fingerprint")) for name, s in meta["splits"].items()},
            raw=dict(meta))

    def to_dict(self) -> dict:
        """The metadata as stored (the dict it was read from)."""
        return dict(self.raw)

    @property
    def extra_arrays(self) -> tuple[str, ...]:
        """The optional arrays (store/arrays/) this store holds: `extra_arrays` (checked by trust.meta_problems)."""
        return tuple(self.raw.get("extra_arrays") or ())

    @property
    def layout(self) -> str:
        """"examples" (one row per example) or "tokens" (one row per chunk of the token stream; `lm` says more)."""
        return str(self.raw.get("layout") or "examples")

    @property
    def lm(self) -> dict:
        """A token store's `lm` entry (chunk_tokens, targets, hidden_layers, ...; checked by trust.meta_problems)."""
        return dict(self.raw.get("lm") or {})

    @property
    def label_dtype(self) -> str:
        return "float32" if self.task.is_regression else "int64"

    def split_arrays(self, split: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """{array: (shape, dtype)} the metadata promises for `split`."""
        return split_arrays(self.splits[split].num_examples, self.max_seq_length, self.task.num_labels,
                            self.teacher.num_layers, self.teacher.hidden_size, self.cls_dtype, self.label_dtype,
                            self.extra_arrays, self.lm if self.layout == "tokens" else None)

    def expected_arrays(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        return {s: self.split_arrays(s) for s in self.splits}
