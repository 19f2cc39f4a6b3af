"""Progress bars (rich) that show examples/s, and plain log lines when output is not a terminal."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?/s" if speed is None else f"{speed:,.1f} {self.unit}/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress, task_id, total: int, description: str, unit: str):
        self.progress, self.task_id, self.total, self.description = progress, task_id, total, description
        self.unit = unit
        self.done, self.t0, self._last_log = 0, time.perf_counter(), time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        self.progress.update(self.task_id, advance=n)
        now = time.perf_counter()
        if not console.is_terminal and now - self._last_log > 30:  # log files get a line every 30 s
            self._last_log = now
            console.print(f"{self.description}: {self.done:,}/{self.total:,} ({self.rate():,.1f} {self.unit}/s)")

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)


@contextmanager
def progress_bar(total: int, description: str, unit: str = "ex"):
    """`with progress_bar(n, "dump train") as bar: bar.advance(k)`; `unit` names what is counted."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        disable=not console.is_terminal, transient=False)
    with progress:
        task_id = progress.add_task(description, total=total)
        bar = _Bar(progress, task_id, total, description, unit)
        yield bar
    if not console.is_terminal:
        console.print(f"{description}: {bar.done:,} {unit} in {time.perf_counter() - bar.t0:.1f}s "
                      f"({bar.rate():,.1f} {unit}/s)")


def log(message: str) -> None:
    console.print(message, highlight=False)
    sys.stderr.flush()
