"""Which examples dump runs together, and which rank runs them.

A *sort window* is a run of whole chunks whose examples are sorted by length together (teacher/run.py), so each
batch is padded only to its own longest sequence. The window is the unit of work: the batches are a pure function
of the window, so a store is the same byte for byte whichever process, rank or resumed run computed a window.
Under `torchrun`, rank 0 shares out the windows that still have chunks to write, balanced by the teacher's padded
tokens, and every rank runs its share.
"""
from __future__ import annotations

import numpy as np

from ..distributed import balanced_shares
from ..teacher.run import chunk_batches


def sort_windows(n: int, chunk_size: int, sort_window: int) -> list[tuple[int, int]]:
    """[start, stop) of the windows whose examples are sorted by length together: whole chunks, >= one chunk."""
    step = max(1, sort_window // chunk_size) * chunk_size
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def chunk_ranges(start: int, stop: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_size, stop)) for a in range(start, stop, chunk_size)]


def window_tokens(lengths: np.ndarray, batch_size: int, max_length: int, bucketed: bool) -> int:
    """Padded tokens the teacher runs for a window with these example lengths (its cost)."""
    if not bucketed:
        return len(lengths) * max_length
    return sum(int(lengths[b].max()) * len(b) for b in chunk_batches(lengths, batch_size, True))


def share_windows(windows: list[tuple[int, int]], costs: list[float], world: int) -> list[list[list[int]]]:
    """For each rank, its windows as [start, stop] lists (JSON-ready), balanced by cost."""
    return [[list(windows[i]) for i in share] for share in balanced_shares(costs, world)]
