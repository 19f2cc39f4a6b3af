"""Online KD (`distill --teacher DIR`, no store): the teacher runs on every step, for comparison with the cache.

`OnlineSource` stands where a `Store` stands in `distill`: it tokenises the task's examples into memory and
serves batches in exactly the order a store of the same examples and chunk size would (the same `epoch_groups`,
the same reader), then runs the teacher on each training batch to add its logits and [CLS] vectors. So a
student trained online and one trained from the store see the same batches; only where the teacher's outputs
come from differs (and their precision: the store keeps float16 CLS, online they stay float32).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .data.loading import load_examples
from .data.tasks import get_task
from .data.tokenize import to_model_inputs, tokenize
from .errors import PkdCacheError
from .store.chunks import ArrayChunks
from .store.fingerprint import vocab_fingerprint
from .store.format import TOKEN_DTYPES
from .models import check_max_length, load_for_task
from .teacher.run import teacher_outputs


class ArrayArray:
    """An in-memory array with the shape, dtype, chunks and path the chunk readers expect."""

    def __init__(self, values: np.ndarray, rows: int, path: str):
        self.values, self.path = values, path
        self.shape, self.dtype, self.fill_value = values.shape, values.dtype, 0
        self.chunks = (min(rows, len(values)),) + values.shape[1:]

    def __getitem__(self, key):
        return self.values[key]


class ArrayChunkReader(ArrayChunks):
    """The `ChunkReader` interface over an in-memory array."""

    def read_into(self, coords: tuple[int, ...], out: np.ndarray) -> np.ndarray:
        rows = self.chunks[0]
        part = self.array.values[coords[0] * rows:(coords[0] + 1) * rows]
        out[:len(part)] = part
        out[len(part):] = 0
        return out


class OnlineSource:
    """The task's examples, tokenised in memory, and a teacher that labels each training batch as it is drawn."""

    def __init__(self, teacher: str, task_name: Optional[str], data_dir: Optional[str], max_seq_length: int,
                 chunk_size: int, device: torch.device, max_examples: Optional[int] = None):
        if not task_name:
            raise PkdCacheError("online KD (--teacher) needs --task")
        task = get_task(task_name)
        loaded = load_for_task(teacher, task)
        if loaded.head_is_new:
            raise PkdCacheError(f"--teacher {teacher} has no trained {task.name} head; fine-tune it first "
                                f"(`pkd-cache finetune`)")
        check_max_length(loaded, max_seq_length)
        self.path, self.task, self.device = f"online:{teacher}", task, device
        self.model = loaded.model.to(device).eval()
        cfg = self.model.config
        self.teacher_layers, self.hidden_size = cfg.num_hidden_layers, cfg.hidden_size
        self.arrays: dict[str, dict[str, ArrayArray]] = {}
        for split in (*[s for s in task.splits if s not in task.dev_splits], *task.dev_splits):
            ex = load_examples(task, split, data_dir, max_examples)
            tokens = tokenize(loaded.tokenizer, ex, 0, len(ex), max_seq_length)
            self.arrays[split] = {k: ArrayArray(v, chunk_size, f"{split}/{k}")
                                  for k, v in {**tokens, "labels": ex.labels}.items()}
        self.meta = {"task": {"name": task.name, "label_names": list(task.label_names)},
                     "teacher": {"name_or_path": teacher, "base_model": loaded.base_model,
                                 "num_layers": self.teacher_layers, "hidden_size": self.hidden_size,
                                 "weights_fingerprint": None},
                     "tokenizer": {"vocab_fingerprint": vocab_fingerprint(loaded.tokenizer)},
                     "max_seq_length": max_seq_length}

    def info(self) -> dict:
        return dict(self.meta)

    @property
    def splits(self) -> list[str]:
        return list(self.arrays)

    def num_examples(self, split: str) -> int:
        if split not in self.arrays:
            raise PkdCacheError(f"task {self.task.name} has no split {split!r}; it has {', '.join(self.splits)}")
        return len(self.arrays[split]["labels"].values)

    def array(self, split: str, name: str) -> ArrayArray:
        return self.arrays[split][name]

    def chunk_reader(self, split: str, name: str) -> ArrayChunkReader:
        return ArrayChunkReader(self.arrays[split][name])

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                layers: Optional[Sequence[int]] = None, fields: Sequence[str] = (), prefetch: int = 2,
                pin_memory: bool = False, start_batch: int = 0, shard: tuple[int, int] = (0, 1),
                **_) -> Iterator[dict[str, torch.Tensor]]:
        """The store's batches for the same examples; `logits` and `cls` come from a teacher forward on each."""
        from .store.stream import iter_batches

        stored = [f for f in fields if f in (*TOKEN_DTYPES, "labels")]
        for batch in iter_batches(self, split, batch_size, shuffle, seed, epoch, None, stored,
                                  prefetch=prefetch, pin_memory=pin_memory, start_batch=start_batch, shard=shard):
            if "logits" in fields or "cls" in fields:
                logits, cls = teacher_outputs(self.model, to_model_inputs(batch, self.device))
                batch["logits"] = logits
                if "cls" in fields:
                    batch["cls"] = cls if layers is None else cls[:, list(layers)]
            yield batch
