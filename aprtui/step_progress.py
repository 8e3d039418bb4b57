"""The engine's long steps (engine.progress) shown on stderr by the command line.

A step is shown only once it has run for QUIET_SECONDS, so the everyday case (a small model in
the page cache) prints nothing. On a terminal it is one line rewritten in place and erased when
the step ends; otherwise (piped, logged) a line every EVERY_SECONDS and a last one with the
total and the time taken, so a log shows the run was alive and what it was doing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

QUIET_SECONDS = 1.0
"""A step that ends sooner is never shown."""

EVERY_SECONDS = 5.0
"""Seconds between two lines of the same step when stderr is not a terminal."""


def _unit(total: int) -> tuple[str, int]:
    """The unit a step of `total` bytes is counted in: MiB below 1 GiB, else GiB."""
    return ("MiB", 1 << 20) if total < 1 << 30 else ("GiB", 1 << 30)


class StepProgress:
    """An engine.progress listener writing to `stream` (stderr). Thread-safe: a step reports
    from the threads that share its work."""

    def __init__(
        self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lock = threading.Lock()
        self.started: dict[str, float] = {}
        self.shown: dict[str, float] = {}  # label -> when its last line was written
        self.width = 0

    def __call__(self, label: str, done: int, total: int) -> None:
        with self.lock:
            now = self.clock()
            start = self.started.setdefault(label, now)
            if done >= total:  # the step has ended
                del self.started[label]
                if label in self.shown:
                    del self.shown[label]
                    self._end(label, total, now - start)
                return
            if now - start < QUIET_SECONDS:
                return
            if not self.tty and now - self.shown.get(label, -EVERY_SECONDS) < EVERY_SECONDS:
                return
            self.shown[label] = now
            unit, scale = _unit(total)
            percent = 100 * done // max(total, 1)
            self._line(
                f"apr-tui: {label}: {done / scale:.1f} of {total / scale:.1f} {unit} ({percent}%)"
            )

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _end(self, label: str, total: int, seconds: float) -> None:
        if self.tty:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        else:
            unit, scale = _unit(total)
            self.stream.write(f"apr-tui: {label}: {total / scale:.1f} {unit} in {seconds:.1f} s\n")
        self.stream.flush()
