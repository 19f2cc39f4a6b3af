"""A store's split as a Hugging Face `datasets.Dataset` (`Store.to_hf_dataset`), never copied into the HF cache.

- Arrow stores: each shard file is opened in place (`Dataset.from_file`: the dataset's cache files are the store's
  own shards). Every shard is first read once through the checked reader (its CRC and its values), so a tampered
  shard is refused here rather than handed over.
- Zarr stores have no Arrow files to open: the split is read (checked) and built in memory (`Dataset.from_dict`),
  which costs about the split's decoded size in RAM (`bytes_per_example` x N; `info` shows the store's size).

Columns as in the Arrow flavour (docs/FORMAT.md): the token arrays, `labels`, `logits`, and one `cls_<layer>` column
per layer (`cls_0` the embeddings); with int8 CLS, `cls_scale` too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PkdCacheError
from .format import ARRAYS, layer_part

if TYPE_CHECKING:
    from .reader import Store


def to_hf_dataset(store: "Store", split: str):
    import datasets

    n = store.num_examples(split)
    names = [a for a in ARRAYS if a != "cls"] + ["cls"] + (["cls_scale"] if store.meta.cls_dtype == "int8" else [])
    if store.store_format == "arrow":
        if store.location.url:
            raise PkdCacheError(f"to_hf_dataset opens an Arrow store's shards in place, and {store.path} is not on "
                                f"this machine; copy it here first (a Zarr store would be read into memory)")
        size = store.meta.chunk_size
        for name in names:  # every shard's CRC and values, once
            array = store.array(split, name)
            for c in range(-(-n // size)):
                array.chunk(c)
        shards = [str(store.location.local / split / f"{c:05d}.arrow") for c in range(-(-n // size))]
        return datasets.concatenate_datasets([datasets.Dataset.from_file(s) for s in shards])
    rows = store.read(split, 0, n, fields=[a for a in names if a != "cls_scale"])
    if "cls_scale" in names:  # `read` dequantised the CLS rows; the column keeps the int8 store's view
        rows["cls_scale"] = store.array(split, "cls_scale")[0:n]
    cls = rows.pop("cls")
    columns = {**{k: v for k, v in rows.items()}, **{layer_part("cls", i): cls[:, i] for i in range(cls.shape[1])}}
    return datasets.Dataset.from_dict(columns)
