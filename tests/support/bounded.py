"""Reading a child process's output line by line without ever waiting unboundedly.

`for line in process.stderr` and `process.stdout.readline()` block for as long as the child
neither writes nor exits: a child that hangs (the very bug some tests look for) would hang the
suite with it. `lines_within` reads the pipe's descriptor directly, waits with `select` at
most until a deadline, and fails the test when it passes.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from typing import IO


def lines_within(stream: IO, seconds: float, what: str) -> Iterator[str]:
    """The lines `stream` (a pipe from a child) delivers, until end of file; AssertionError
    naming `what` when `seconds` pass first. Read through the descriptor: nothing must have
    been read through `stream` itself before (its buffer would be skipped)."""
    fd = stream.fileno()
    deadline = time.monotonic() + seconds
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line of {what} within {seconds:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:  # end of file: the last, unterminated line if any
            if pending:
                yield pending.decode()
            return
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode() + "\n"


def first_line_within(stream: IO, seconds: float, what: str) -> str:
    """The first line `stream` delivers (see lines_within)."""
    for line in lines_within(stream, seconds, what):
        return line
    raise AssertionError(f"{what} ended without a line")
