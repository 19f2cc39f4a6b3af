"""Online KD (`distill --teacher DIR`, no store): the teacher runs on every step, for comparison with the cache.

`OnlineSource` is a `BatchSource` (sources.py), as a `Store` is, and `distill` takes either (`open_source`): it
tokenises the task's examples into memory and serves batches in exactly the order a store of the same examples and
chunk size would (the same `epoch_groups`, the same reader), then runs the teacher on each training batch to add its
logits and [CLS] vectors. So a student trained online and one trained from the store see the same batches; only
where the teacher's outputs come from differs (and their precision: the store keeps float16 CLS, online they stay
float32).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .data.loading import load_examples
from .data.tasks import get_task
from .data.tokenize import to_model_inputs, tokenize
from .errors import PkdCacheError
from .store.fingerprint import vocab_fingerprint
from .store.format import FORMAT_VERSION, TOKEN_DTYPES, SplitMeta, StoreMeta, TaskMeta, TeacherMeta, TokenizerMeta
from .store.memory import ArrayArray, ArrayChunkReader
from .models import check_max_length, load_for_task
from .teacher.run import teacher_outputs


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
        vocab_fp = vocab_fingerprint(loaded.tokenizer)
        self.meta = StoreMeta(  # what distill reads of a store's metadata, for the teacher as it runs here
            format_version=FORMAT_VERSION, complete=True, chunk_size=chunk_size, max_seq_length=max_seq_length,
            cls_dtype="float32", store_format="memory",
            teacher=TeacherMeta(num_layers=self.teacher_layers, hidden_size=self.hidden_size, name_or_path=teacher,
                                base_model=loaded.base_model),
            task=TaskMeta(num_labels=task.num_labels, is_regression=task.is_regression, name=task.name,
                          label_names=tuple(task.label_names)),
            tokenizer=TokenizerMeta(vocab_size=len(loaded.tokenizer), vocab_fingerprint=vocab_fp),
            splits={s: SplitMeta(num_examples=len(a["labels"].values)) for s, a in self.arrays.items()})

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
