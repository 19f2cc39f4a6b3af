"""SIGTERM (a scheduler's stop, `kill`, `timeout`) stops a long command as Ctrl-C does: it unwinds, so a dump's
writer drains and its store stays resumable, and a fine-tune's half-written output is removed."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def stop_on_sigterm():
    """Within this block SIGTERM raises KeyboardInterrupt (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
