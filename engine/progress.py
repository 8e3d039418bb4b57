"""Progress of the engine's long steps, told to whoever listens; the engine itself never prints.

A step that can take seconds on a big input (the footer CRC of a 7B APR file: 4-8 GB read and
summed at open, tens of seconds from a cold disk) calls `report(label, done, total)` as it goes.
The command line installs a listener for the run (`listening`); with none installed, nothing
happens. The listener lives in a context variable, so it belongs to the thread that installed
it and to the helpers that run in a copy of its context; the explorer installs none (Textual
owns the terminal there). A step that reports from several threads captures the listener once
(`listener()`) on the calling thread and calls it from any of them: listeners are thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Listener = Callable[[str, int, int], None]
"""(label, done, total), in the step's own unit (bytes for the footer CRC); done == total last."""

_LISTENER: ContextVar[Listener | None] = ContextVar("apr_tui_progress", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this thread's progress reports to `listener` for the block."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def listener() -> Listener | None:
    """The listener installed in this context, or None."""
    return _LISTENER.get()
