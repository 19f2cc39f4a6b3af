"""Where a student's batches come from: a store (the teacher's outputs, cached once by `dump`) or, for online KD, the
teacher itself (online.py). `BatchSource` is what `distill` needs of either; `open_source` picks one from the config,
so distill never builds a teacher and never asks which kind it has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .config import DistillConfig
    from .store.format import StoreMeta


@runtime_checkable
class BatchSource(Protocol):
    """The examples of a task with the teacher's outputs for them: `store.reader.Store` and `online.OnlineSource`."""

    @property
    def teacher_layers(self) -> int:
        """The teacher's transformer layers (its CLS vectors are rows 0..teacher_layers, 0 the embeddings)."""

    @property
    def hidden_size(self) -> int:
        """The width of the teacher's CLS vectors."""

    @property
    def splits(self) -> list[str]:
        """The splits there are examples of."""

    @property
    def meta(self) -> StoreMeta:
        """The store's metadata, typed (for online KD: the task, the teacher as it runs, its tokenizer)."""

    def num_examples(self, split: str) -> int:
        """The examples of `split`; names the splits there are when it is not one of them."""

    def batches(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                layers: Optional[Sequence[int]] = None, fields: Sequence[str] = (), prefetch: int = 2,
                pin_memory: bool = False, start_batch: int = 0, shard: tuple[int, int] = (0, 1),
                workers: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `fields` in the store's order for (seed, epoch), `cls` restricted to `layers`; `shard=(r, W)`
        is rank r's part of each batch (`store.stream.iter_batches`)."""


def open_source(config: DistillConfig, device: torch.device) -> BatchSource:
    """The store `config.store` names, or (online KD, `config.teacher`) the teacher on `device` over the task's
    examples."""
    if config.teacher is None:
        from .store.reader import open_store

        return open_store(config.store, allow_no_checksums=config.allow_no_checksums)
    from .online import OnlineSource

    return OnlineSource(config.teacher, config.task, config.data_dir, config.max_seq_length, config.chunk_size,
                        device, config.max_examples)
