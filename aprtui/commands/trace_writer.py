"""Writing a trace's stage files while the forward pass runs (`apr-tui trace`).

`Writer` hands each capture to a background thread so that creating files overlaps the
arithmetic, with a bounded queue; `Progress` shows layer progress on stderr; `Interrupt` turns
the first Ctrl+C into a request to stop between stages, so no stage file is ever cut short.
The command's flow (checks, tokens.json, the report) stays in aprtui.commands.trace.
"""

from __future__ import annotations

import sys
from pathlib import Path


class Interrupt:
    """Ctrl+C during the pass: finish the stage file being written, then stop.

    The first SIGINT sets `cancel` (the forward pass checks it between stages), so no stage
    file is ever cut short; the command then raises KeyboardInterrupt (exit 130). A second
    Ctrl+C interrupts at once, as usual.
    """

    def __init__(self) -> None:
        import threading

        self.cancel = threading.Event()
        self._previous = None

    def __enter__(self) -> Interrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            if self._previous is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._handle)
            else:
                self._previous = None
        return self

    def _handle(self, signum: int, frame: object) -> None:
        import signal

        self.cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Progress:
    """Layer progress on stderr: a rich bar on a terminal, one plain line per layer otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[cyan]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("layers"),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = None

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            sys.stderr.write(f"{self.label}: layer {done}/{total}\n")
            sys.stderr.flush()
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done)


def _write(directory: Path, capture, overwrite) -> Path:
    """One capture to its stage file (its directory already made); a lazy attention capture is
    streamed block by block. `overwrite`: the predicate on stage paths the run may replace."""
    from engine.aprt import write_aprt, write_stage_stream
    from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER, stage_path

    if hasattr(capture.array, "blocks"):
        blocks = (block for _, block in capture.array.blocks())
        return write_stage_stream(
            directory, capture.stage, capture.layer, capture.array.size, blocks, overwrite=overwrite
        )
    per_layer = STAGE_BY_NAME[capture.stage].per_layer
    path = stage_path(directory, capture.stage, capture.layer)
    header_layer = capture.layer if per_layer else WHOLE_MODEL_LAYER
    return write_aprt(path, header_layer, capture.array, overwrite=overwrite(path))


WRITE_AHEAD_BYTES = 64 * 1024 * 1024
"""Bytes of captures waiting for the writer thread before the pass waits for it."""


class Writer:
    """Stage files written by a background thread while the pass computes the next stages.

    Creating a file costs a few milliseconds of system calls (483 of them for a full SmolLM2
    trace: ~1 s); the thread overlaps them with the arithmetic. In order, at most
    WRITE_AHEAD_BYTES of captures queued (the pass waits beyond that), and a lazy attention
    capture (streamed block by block) is written by the pass itself after the queue drains,
    so memory stays bounded. A failed write is raised at the next submit or at the end.
    """

    def __init__(self, out, overwrite) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        """The run's TraceOutput: directories are made and written files recorded through it,
        on the calling thread, so a failed run takes back exactly what it made."""
        self.directory = out.directory
        self.overwrite = overwrite
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aprt-writer")
        self.pending: list = []  # (future, nbytes)
        self.written: list[Path] = []
        self.made: set[Path] = set()

    def submit(self, capture) -> None:
        from engine.stages import stage_path

        parent = stage_path(self.directory, capture.stage, capture.layer).parent
        if parent not in self.made:  # one mkdir per layer directory, on this thread
            self.out.mkdir(parent)
            self.made.add(parent)
        if hasattr(capture.array, "blocks"):
            self._drain(0)
            self.written.append(self.out.record(_write(self.directory, capture, self.overwrite)))
            return
        nbytes = int(capture.array.nbytes)
        self._drain(WRITE_AHEAD_BYTES - nbytes)
        future = self.pool.submit(_write, self.directory, capture, self.overwrite)
        self.pending.append((future, nbytes))

    def _drain(self, budget: int) -> None:
        """Collect finished writes in order; wait while the queue holds more than budget."""
        while self.pending and (
            self.pending[0][0].done() or sum(n for _, n in self.pending) > budget
        ):
            future, _ = self.pending.pop(0)
            self.written.append(self.out.record(future.result()))

    def close(self) -> list[Path]:
        """Wait for every queued write (also after an interrupt) and return the paths."""
        try:
            while self.pending:
                future, _ = self.pending.pop(0)
                self.written.append(self.out.record(future.result()))
        finally:
            self.pool.shutdown(wait=True)
        return self.written
