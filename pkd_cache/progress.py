"""What a run tells its user while it works: log lines and progress bars, both on stderr.

Log lines go through the standard `logging` module, logger "pkd_cache", so that an API user redirects or silences
them like any library's: `logging.getLogger("pkd_cache").setLevel(logging.WARNING)` silences them, a handler of
their own receives them. Only when nobody configured logging (no handler on "pkd_cache", none on the root logger)
does the first line install the default handler: rich, bare message, never wrapped (log files and the tests read
whole lines). The CLI installs it explicitly (`log_to_stderr`). Messages are rich markup (`rich.markup.escape`
what came from outside), as they were when this module printed them itself.

Progress bars are rich, on a terminal only; elsewhere a bar is a log line every 30 s and one at the end.
`with quiet():` silences both for the current context (a non-zero rank, a sweep's runs) without touching any
logger or console that other code shares.
"""
from __future__ import annotations

import contextvars
import logging
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

logger = logging.getLogger("pkd_cache")

# The bars' console, and the default handler's. Nothing changes it once made: `quiet()` is per context.
console = Console(stderr=True, soft_wrap=True)

_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("pkd_cache_quiet", default=False)


class LineHandler(RichHandler):
    """A RichHandler that prints the message alone: no time, level or path columns, and no wrapping."""

    def __init__(self, console: Console):
        super().__init__(console=console, markup=True, highlighter=NullHighlighter(), keywords=[], show_time=False,
                         show_level=False, show_path=False)

    def render(self, *, record, traceback, message_renderable):
        return message_renderable if traceback is None else super().render(
            record=record, traceback=traceback, message_renderable=message_renderable)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.console.file.flush()  # a line is seen when it is logged, even through a pipe


_handler = LineHandler(console)


def log_to_stderr() -> None:
    """Show pkd_cache's log lines on stderr (the CLI's choice; the default when logging is not configured)."""
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    if logger.level == logging.NOTSET:  # a level the user chose stays
        logger.setLevel(logging.INFO)


def _is_quiet() -> bool:
    return _quiet.get()


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """No log lines and no progress bars inside (when `enabled`); nests, and only this context is affected."""
    token = _quiet.set(enabled or _quiet.get())
    try:
        yield
    finally:
        _quiet.reset(token)


def log(message: str) -> None:
    """One line for the user (rich markup), at INFO on the "pkd_cache" logger."""
    if _is_quiet():
        return
    if not logger.handlers and not logging.getLogger().handlers:
        log_to_stderr()  # nobody configured logging: the lines still reach the user
    logger.info(message)


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
            log(f"{self.description}: {self.done:,}/{self.total:,} ({self.rate():,.1f} {self.unit}/s)")

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)


@contextmanager
def progress_bar(total: int, description: str, unit: str = "ex"):
    """`with progress_bar(n, "dump train") as bar: bar.advance(k)`; `unit` names what is counted."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        disable=_is_quiet() or not console.is_terminal, transient=False)
    with progress:
        task_id = progress.add_task(description, total=total)
        bar = _Bar(progress, task_id, total, description, unit)
        yield bar
    if not console.is_terminal:
        log(f"{description}: {bar.done:,} {unit} in {time.perf_counter() - bar.t0:.1f}s ({bar.rate():,.1f} {unit}/s)")
