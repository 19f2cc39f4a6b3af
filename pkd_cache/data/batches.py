"""Batches of torch tensors from in-memory arrays: the raw-data path used by finetune and eval."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..store.stream import trim_padding


class ArrayBatches:
    """Shuffled (seeded per epoch) or ordered batches over a dict of equal-length numpy arrays."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int):
        self.arrays, self.batch_size = arrays, batch_size
        self.n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch(self, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = np.random.default_rng([seed, epoch]).permutation(self.n) if shuffle else np.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield trim_padding({k: torch.from_numpy(v[idx]) for k, v in self.arrays.items()})
