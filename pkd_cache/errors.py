"""The one exception type users see: a bad input, said in one line.

Everything the CLI catches as a `PkdCacheError` is printed as ``error: <message>`` with a non-zero exit and
no traceback. Anything else is a bug in pkd-cache and is reported as such (``--debug`` shows the traceback).
"""


class PkdCacheError(ValueError):
    """A problem with the user's input or environment, explained in one line."""


def first_line(e: BaseException) -> str:
    """A library's exception as the one line a PkdCacheError quotes (its type name when it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Interrupted(PkdCacheError):
    """Ctrl-C or SIGTERM stopped the work cleanly; the message says what was kept and how to continue."""


class StoreBusy(PkdCacheError):
    """Another live process is writing the store (it holds the store's writer lock); the message names it."""
