"""A comparison's second pass in a forked child process, its captures streamed back on a pipe.

Why: a short comparison of two models (`bisect MODEL COPY`) runs one step after the other on
one thread (engine.plan, PIPELINE_MIN_FLOPS): pass A, pass B, the statistics and the local
error take turns, and threads side by side would hand the GIL over at every small numpy call.
A forked child has its own interpreter: it runs pass B on the second core while the parent runs
pass A, the statistics and the local error, and the two meet only at a pipe, a message a batch
of captures (BATCH_BYTES), not a hand-over a numpy call.

How: `os.fork` when the comparison starts, before any helper thread of the run exists (a lock
another thread held at the fork, inside BLAS say, would stay held in the child forever), so
the child inherits the opened model and reads nothing again. It runs the very pass the parent
would have run (`make_stream()`, the same code on the same memory map: the same bits) and
writes each batch as a length-prefixed pickle (protocol 5: an array's bytes are copied once),
then an empty message at the end. The pipe holds PIPE_BYTES (Linux F_SETPIPE_SZ), so the child
runs at most that far ahead of the parent: memory stays bounded whatever the prompt.

A failure is never the child's to report: an exception in the pass, a child that died, a pickle
that would not load, a silence of REPLY_TIMEOUT_S all end the child, and the parent runs the
pass itself, skipping the captures it already yielded, so an error in B's file is raised by
the parent's own pass with the words it always had. The child is kept harmless as the decoding
child is (engine.decoder_process.become_harmless_child: descriptors closed, SIGINT ignored, no
cyclic collection, `os._exit`), and it ends when the parent closes the pipe or dies (its next
write fails).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from engine.decoder_process import become_harmless_child, fork_with_signals_blocked

PASS_PROCESS = hasattr(os, "fork")
"""Whether a comparison may run its second pass in a forked child (POSIX)."""

BATCH_BYTES = 256 << 10
"""Array bytes the child gathers before it writes a message: SmolLM2 at 16 tokens, a few
stages of a layer a message (a message per capture costs the parent a wake-up each)."""

PIPE_BYTES = 4 << 20
"""How much the child may be ahead of the parent, in bytes on the pipe (asked of Linux with
F_SETPIPE_SZ; the kernel's limit, 1 MiB by default for an unprivileged process, may cap it)."""

REPLY_TIMEOUT_S = 120.0
"""The longest the parent waits for the child's next message before it ends the child and runs
the pass itself: a batch of a short prompt's pass takes milliseconds; minutes only pass if the
child hangs or the machine is swapping."""

_LENGTH = struct.Struct("<Q")
_F_SETPIPE_SZ = 1031  # fcntl.h on Linux


class ForkedPass:
    """`make_stream()`'s captures, computed by a child forked in the constructor.

    Iterate once; `close()` ends the child (also when iteration stops early). Raises OSError
    from the constructor when no child can be forked (the caller then runs the pass itself)."""

    def __init__(self, make_stream: Callable[[], Iterator[Any]]) -> None:
        self.make_stream = make_stream
        self.delivered = 0
        self.pid = 0
        read_end, write_end = os.pipe()
        with suppress(OSError):  # Linux only; the default size works, with less run-ahead
            import fcntl

            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_BYTES)
        try:
            pid = fork_with_signals_blocked()
        except BaseException:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the child: never returns
            os.close(read_end)
            _child_main(make_stream, write_end)
        os.close(write_end)
        self.pid, self.reader = pid, read_end

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:  # the child failed: the rest is computed here
                    break
                if not batch:  # the end
                    return
                for capture in batch:
                    self.delivered += 1
                    yield capture
        finally:
            self.close()
        for index, capture in enumerate(self.make_stream()):
            if index >= self.delivered:
                yield capture

    def _next_batch(self) -> list[Any] | None:
        """The next batch of captures, [] at the end, None when the child failed."""
        header = self._read(_LENGTH.size)
        if header is None:
            return None
        (length,) = _LENGTH.unpack(header)
        if length == 0:
            return []
        payload = self._read(length)
        if payload is None:
            return None
        try:
            batch = pickle.loads(payload)
        except Exception:  # a torn or foreign message: trust nothing more from the child
            return None
        return batch if isinstance(batch, list) and batch else None

    def _read(self, count: int) -> bytes | None:
        """Exactly `count` bytes from the child, or None (EOF, an error, REPLY_TIMEOUT_S)."""
        chunks, missing = [], count
        while missing:
            if self.pid == 0:
                return None
            ready, _, _ = select.select([self.reader], [], [], REPLY_TIMEOUT_S)
            if not ready:
                return None
            try:
                chunk = os.read(self.reader, min(missing, 1 << 20))
            except OSError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def __del__(self) -> None:  # never iterated (the comparison failed first): end the child
        self.close()

    def close(self) -> None:
        """End the child (killed: it holds nothing that needs a clean exit) and reap it."""
        if self.pid == 0:
            return
        pid, self.pid = self.pid, 0
        os.close(self.reader)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _child_main(make_stream: Callable[[], Iterator[Any]], out: int) -> None:
    """The child's whole life: run the pass, write its captures, then `os._exit`."""
    code = 1
    try:
        become_harmless_child(out)
        batch: list[Any] = []
        size = 0
        for capture in make_stream():
            batch.append(capture)
            size += int(getattr(capture.array, "nbytes", 0))
            if size >= BATCH_BYTES:
                _write(out, pickle.dumps(batch, protocol=5))
                batch, size = [], 0
        if batch:
            _write(out, pickle.dumps(batch, protocol=5))
        _write(out, b"")  # the end
        code = 0
    except BaseException:  # the parent sees the pipe close early and runs the pass itself
        code = 1
    finally:
        os._exit(code)


def _write(out: int, payload: bytes) -> None:
    view = memoryview(_LENGTH.pack(len(payload)) + payload)
    while view:
        view = view[os.write(out, view) :]
