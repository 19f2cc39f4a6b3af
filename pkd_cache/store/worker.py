"""A thread at one end of a bounded queue, whose exception is handed back to the caller.

Two uses: the dump writes chunks on a thread while the teacher computes the next ones (`Consumer`: the caller
produces, the thread consumes; `InlineConsumer` where the teacher keeps every CPU core busy itself), and the reader
loads groups of chunks on a thread while the student trains (`produce`: the thread produces, the caller consumes).
The queue is bounded either way, so memory stays flat: the faster side waits for the slower one. An exception on
the thread is raised in the caller, never lost, and the thread never blocks forever on a queue the caller has
stopped serving.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional

_DONE = object()


def pool_threads(workers: Optional[int] = None) -> int:
    """Threads for a decoding or coding pool: `workers` where given, else up to 4 (this process's cores)."""
    return min(4, os.cpu_count() or 1) if workers is None else workers


class Consumer:
    """`put` items, `close` at the end; a thread runs `work(item)` on each, in order. The first exception `work`
    raises is re-raised by the next `put` or by `close`; later items are then drained without being worked on."""

    def __init__(self, work: Callable[[Any], None], depth: int, name: str):
        self.work, self.error = work, None
        self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is None:  # after a failure, drain without working so that `put` never blocks forever
                try:
                    self.work(item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.error = e

    def put(self, item: Any) -> None:
        self.raise_error()
        self.queue.put(item)

    def close(self) -> None:
        """Wait until everything queued is worked on; re-raise an error."""
        self.queue.put(_DONE)
        self.thread.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class InlineConsumer:
    """Consumer's interface, with `work(item)` done in `put` on the caller's thread.

    For a producer that keeps every core busy by itself (a teacher on the CPU using all of torch's threads): a second
    thread there does not overlap with it, it preempts one of its threads, and the others wait for that one at the
    end of each parallel op. Measured on the 2-core VM, `dump --task lm` took 8% less time with its rows coded and
    written inline than on a thread (benchmarks/RESULTS.md)."""

    def __init__(self, work: Callable[[Any], None], depth: int = 0, name: str = ""):
        self.work = work

    def put(self, item: Any) -> None:
        self.work(item)

    def close(self) -> None:
        pass


def produce(items: Iterator, depth: int, name: str) -> Iterator:
    """Run the `items` generator `depth` items ahead on a thread; its exception surfaces in the consumer.

    A consumer that stops early (max steps, a fractional epoch) releases the thread and what it holds."""
    if depth <= 0:
        yield from items
        return
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[Optional[BaseException]] = [None]

    def run() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            failure[0] = e
        q.put(_DONE)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            yield item
        if failure[0] is not None:
            raise failure[0]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
