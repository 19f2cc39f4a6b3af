"""A store in the Hugging Face stack: a map-style torch Dataset, a collator, and a `transformers.Trainer` whose loss
is pkd-cache's (CE + KD + patient), so TrainingArguments, `accelerate launch`, torchrun and DeepSpeed drive a
distillation from cached teacher outputs as they drive any Trainer.

    store = pkd_cache.open_store("sst2.zarr")
    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), store=store,
                                  distillation=DistillationArguments(alpha=0.5, temperature=10))
    trainer.train()

Rows are read a chunk at a time: `StoreSampler` visits the examples in the order `pkd-cache distill` does (chunks
shuffled, examples shuffled within groups of chunks, a pure function of (seed, epoch)), so each chunk is decoded
about once an epoch, and the batches are `pkd-cache distill`'s own (tests/test_hf.py holds the two to 1e-5).
Needs `accelerate` for the Trainer (`pip install "pkd-cache[hf]"`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import PkdCacheError
from .store.format import LAYER_AXIS_ARRAYS, TOKEN_DTYPES
from .store.quantize import dequantize_int8
from .store.stream import epoch_groups
from .student.init import student_cls
from .student.layer_map import layer_map
from .student.losses import LossWeights, pkd_loss

TEACHER_FIELDS = {"logits": "teacher_logits", "cls": "teacher_cls"}  # store array -> batch key


class StoreDataset(torch.utils.data.Dataset):
    """Split `split` of a store as a map-style Dataset of dicts: the token arrays, `labels`, and the teacher fields
    asked for (`fields`: "logits", "cls"), as `teacher_logits` and `teacher_cls` (the CLS rows of `layers`,
    indices into the teacher's L+1: 0 is the embeddings).

    It holds the store's path, not an open store: each DataLoader worker opens it on first use, and decoded chunks
    are cached (`cache_chunks` per array) so that a batch in `StoreSampler` order decodes each chunk once."""

    def __init__(self, store, split: str = "train", fields: Sequence[str] = ("logits", "cls"),
                 layers: Optional[Sequence[int]] = None, cache_chunks: int = 16):
        unknown = [f for f in fields if f not in TEACHER_FIELDS]
        if unknown:
            raise PkdCacheError(f"StoreDataset fields are {', '.join(TEACHER_FIELDS)}; got {unknown[0]!r}")
        if "cls" in fields and not layers:
            raise PkdCacheError("StoreDataset: fields with 'cls' need the teacher layers to read (layers=[...])")
        self._store = store if not isinstance(store, str) else None
        self.path = store if isinstance(store, str) else store.path
        self.split, self.fields, self.cache_chunks = split, tuple(fields), cache_chunks
        self.layers = list(layers) if layers else None
        self.arrays = tuple(TOKEN_DTYPES) + ("labels",) + tuple(fields)
        self._len = self.store.num_examples(split)
        self.chunk_size = self.store.meta.chunk_size
        self._chunks: OrderedDict = OrderedDict()

    @property
    def store(self):
        if self._store is None:
            from .store.reader import open_store

            self._store = open_store(self.path)
        return self._store

    def __getstate__(self) -> dict:  # a worker process opens the store itself, with an empty chunk cache
        return {**self.__dict__, "_store": None, "_chunks": OrderedDict()}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The rows `indices` (what a DataLoader asks for a batch at once), each chunk read once."""
        out = []
        for i in indices:
            i = int(i)
            if not 0 <= i < self._len:
                raise IndexError(f"row {i} of a split of {self._len}")
            c, r = divmod(i, self.chunk_size)
            chunk = self._chunk(c)
            out.append({TEACHER_FIELDS.get(k, k): v[r] for k, v in chunk.items()})
        return out

    def _chunk(self, c: int) -> dict[str, np.ndarray]:
        if c not in self._chunks:
            store, values = self.store, {}
            for name in self.arrays:
                layered = name in LAYER_AXIS_ARRAYS
                values[name] = store.array(self.split, name).chunk(c, self.layers if layered else None)
            if "cls" in values and values["cls"].dtype == np.int8:  # dequantised on read (store/quantize.py)
                scale = store.array(self.split, "cls_scale").chunk(c, self.layers)
                values["cls"] = dequantize_int8(values["cls"], scale)
            self._chunks[c] = values
            while len(self._chunks) > self.cache_chunks:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(c)
        return self._chunks[c]


class StoreSampler(torch.utils.data.Sampler):
    """The examples of a StoreDataset in `pkd-cache distill`'s order for (seed, epoch): chunks in a random order,
    examples shuffled within groups of `shuffle_chunks` chunks. `set_epoch` moves to the next epoch's order (the
    Trainer calls it)."""

    def __init__(self, dataset: StoreDataset, seed: int = 0, shuffle: bool = True, shuffle_chunks: int = 8):
        self.n, self.chunk_size = len(dataset), dataset.chunk_size
        self.seed, self.shuffle, self.shuffle_chunks, self.epoch = seed, shuffle, shuffle_chunks, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for group in epoch_groups(self.n, self.chunk_size, self.shuffle, self.seed, self.epoch, self.shuffle_chunks):
            yield from group.rows.tolist()


class StoreCollator:
    """Rows of a StoreDataset -> a batch of tensors, token arrays as int64 and cut to the batch's longest
    sequence (dynamic padding, as `pkd-cache distill` batches are)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        width = int(batch["attention_mask"].sum(dim=1).max())
        for k in TOKEN_DTYPES:
            batch[k] = batch[k][:, :width].long()
        return batch


@dataclass
class DistillationArguments:
    """PKD's settings, as `pkd-cache distill` takes them (DistillConfig): alpha weighs KD against CE, beta the
    patient loss (None: 100 / the teacher's hidden size, the paper's 100 in its code's units), temperature the KD
    softmax's; the student's layers 1..k-1 are matched to teacher layers by `strategy` (skip or last) or
    `layer_map`."""

    alpha: float = 0.5
    beta: Optional[float] = None
    temperature: float = 10.0
    strategy: str = "skip"
    layer_map: Optional[list[int]] = None


def _trainer_base():
    try:
        from transformers import Trainer
    except ImportError as e:  # the Trainer needs accelerate
        raise PkdCacheError(f"the Hugging Face Trainer cannot be imported ({e}); pip install 'pkd-cache[hf]'") from e
    return Trainer


class DistillationTrainer(_trainer_base()):
    """A `transformers.Trainer` whose `compute_loss` is pkd-cache's PKD loss, over a store.

    `store` (a Store or a path) supplies the training split (its `train` unless `train_dataset` is given, then a
    StoreDataset with the layers this student's map needs) and the teacher's shape. `distillation` (or keyword
    arguments: alpha=..., beta=...) sets the loss. A student narrower than the teacher gets a learned projection
    of its [CLS] vectors, trained with it and not saved (as in `pkd-cache distill`). Everything else, including
    the optimiser, schedule, logging, saving, evaluation, mixed precision and devices, is TrainingArguments'."""

    def __init__(self, *args, store=None, distillation: Optional[DistillationArguments] = None,
                 train_dataset=None, data_collator=None, **kwargs):
        loss_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in DistillationArguments.__dataclass_fields__}
        self.distillation = distillation or DistillationArguments(**loss_kwargs)
        if store is None and train_dataset is None:
            raise PkdCacheError("DistillationTrainer needs store= (or a StoreDataset as train_dataset)")
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        if model is None:
            raise PkdCacheError("DistillationTrainer needs the student model (model=...)")
        store = store if store is not None else train_dataset.store
        if isinstance(store, str):
            from .store.reader import open_store

            store = open_store(store)
        d, meta = self.distillation, store.meta
        self.k = model.config.num_hidden_layers
        self.lmap = layer_map(meta.teacher.num_layers, self.k, d.strategy, d.layer_map)
        beta = d.beta if d.beta is not None else 100.0 / meta.teacher.hidden_size
        self.need_cls = beta > 0 and self.k > 1
        self.weights = LossWeights(alpha=d.alpha, beta=beta, temperature=d.temperature)
        self.regression = meta.task.is_regression
        fields = ("logits", "cls") if self.need_cls else ("logits",)
        if train_dataset is None:
            train_dataset = StoreDataset(store, "train", fields, self.lmap if self.need_cls else None)
        elif self.need_cls and getattr(train_dataset, "layers", None) != self.lmap:
            raise PkdCacheError(f"the train_dataset reads CLS layers {getattr(train_dataset, 'layers', None)}; this "
                                f"{self.k}-layer student's map needs {self.lmap}")
        width = model.config.hidden_size
        self.projection = torch.nn.Linear(width, meta.teacher.hidden_size, bias=False) \
            if self.need_cls and width != meta.teacher.hidden_size else None
        super().__init__(*args, train_dataset=train_dataset, data_collator=data_collator or StoreCollator(),
                         **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        """StoreSampler's order (a chunk decoded about once an epoch, where random rows would decode one per row).
        It is the same on every process (seeded by the run's seed and the epoch), so under torchrun or accelerate
        the Trainer's batch sharding splits it as it splits any sampler's."""
        dataset = self.train_dataset
        if isinstance(dataset, StoreDataset):
            return StoreSampler(dataset, seed=self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # the teacher's fields are not the model's arguments, and must reach compute_loss

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.projection is not None and not any(p is self.projection.weight for g in optimizer.param_groups
                                                   for p in g["params"]):
            optimizer.add_param_group({"params": list(self.projection.parameters()),
                                       "weight_decay": self.args.weight_decay})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        targets = {"labels": inputs["labels"], "logits": inputs["teacher_logits"]}
        outputs = model(**{k: inputs[k] for k in TOKEN_DTYPES}, output_hidden_states=self.need_cls)
        s_cls = None
        if self.need_cls:
            targets["cls"] = inputs["teacher_cls"]
            s_cls = student_cls(outputs.hidden_states, self.k)
            if self.projection is not None:
                self.projection.to(s_cls.device)
                s_cls = self.projection(s_cls)
        loss, _parts = pkd_loss(outputs.logits, s_cls, targets, self.weights, self.regression)
        return (loss, outputs) if return_outputs else loss
