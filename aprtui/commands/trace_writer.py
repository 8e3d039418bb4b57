"""Writing a trace's stage files while the forward pass runs (`apr-tui trace`).

`Writer` writes each capture, inline for a run of small files, on a background thread with a
bounded queue for big ones (their copying then overlaps the arithmetic); `Progress` shows layer
progress on stderr; `Interrupt` turns the first Ctrl+C into a request to stop between stages,
so no stage file is ever cut short.
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


def _write(directory: Path, path: Path, capture, overwrite) -> Path:
    """One capture to its stage file `path` (its directory already made); a lazy attention
    capture is streamed block by block. `overwrite`: the predicate on stage paths the run may
    replace."""
    from engine.aprt import write_aprt, write_stage_stream
    from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER

    if hasattr(capture.array, "blocks"):
        blocks = (block for _, block in capture.array.blocks())
        return write_stage_stream(
            directory, capture.stage, capture.layer, capture.array.size, blocks, overwrite=overwrite
        )
    per_layer = STAGE_BY_NAME[capture.stage].per_layer
    header_layer = capture.layer if per_layer else WHOLE_MODEL_LAYER
    return write_aprt(path, header_layer, capture.array, overwrite=overwrite(path))


WRITE_AHEAD_BYTES = 64 * 1024 * 1024
"""Bytes of captures waiting for the writer thread before the pass waits for it."""

THREAD_MIN_FILE_BYTES = 1024 * 1024
"""Mean stage-file size from which a trace writes on a background thread (`Writer`).
A thread overlaps the kernel's copying of big files with the arithmetic, but every hand-over
wakes it, and on a virtual machine whose host is busy a wake-up is dear (the sleeping virtual
CPU must be scheduled again). Measured on the 2-core development VM, whole-process `apr-tui
trace` of SmolLM2, 37 tokens, all 483 stages (mean 110 KiB a file) on tmpfs, min of 6
interleaved runs, host steal 25%: written by a thread 2.22 s wall (1.69 s CPU, 2,833 voluntary
context switches), inline 2.06 s (1.73 s); with every matrix also decoded on one thread, 1.85 s
vs 1.50 s (1.46 s CPU, 1 switch). Long prompts (attention stages of megabytes) keep the thread."""


class Writer:
    """Stage files written while the pass computes the next stages, or inline.

    Threaded, a background thread writes them in order, with at most WRITE_AHEAD_BYTES of
    captures queued (the pass waits beyond that); a lazy attention capture (streamed block by
    block) is written by the pass itself after the queue drains, so memory stays bounded. A
    failed write is raised at the next submit or at the end. Inline, each capture is written by
    `submit` itself. `file_bytes`, the run's mean stage-file size, decides which
    (THREAD_MIN_FILE_BYTES).
    """

    def __init__(self, out, overwrite, *, file_bytes: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.out = out
        """The run's TraceOutput: directories are made and written files recorded through it,
        on the calling thread, so a failed run takes back exactly what it made."""
        self.directory = out.directory
        self.overwrite = overwrite
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="aprt-writer")
            if file_bytes >= THREAD_MIN_FILE_BYTES
            else None
        )
        self.pending: list = []  # (future, nbytes)
        self.written: list[Path] = []
        self.made: set[Path] = set()

    def submit(self, capture) -> None:
        from engine.stages import stage_path

        path = stage_path(self.directory, capture.stage, capture.layer)
        if path.parent not in self.made:  # one mkdir per layer directory, on this thread
            self.out.mkdir(path.parent)
            self.made.add(path.parent)
        if self.pool is None or hasattr(capture.array, "blocks"):
            self._drain(0)
            written = _write(self.directory, path, capture, self.overwrite)
            self.written.append(self.out.record(written))
            return
        nbytes = int(capture.array.nbytes)
        self._drain(WRITE_AHEAD_BYTES - nbytes)
        future = self.pool.submit(_write, self.directory, path, capture, self.overwrite)
        self.pending.append((future, nbytes))

    def _drain(self, budget: int) -> None:
        """Collect finished writes in order; wait while the queue holds more than budget."""
        while self.pending and (
            self.pending[0][0].done() or sum(n for _, n in self.pending) > budget
        ):
            future, _ = self.pending.pop(0)
            self.written.append(self.out.record(future.result()))

    def close(self) -> list[Path]:
        """Wait for every queued write (also after an interrupt or a failed write), record
        every file written, then raise the first failure, if any, or return the paths.

        Every queued write is waited for and recorded even after one has failed: the thread
        goes on with the queue, and a file it writes after the failure must still be the run's
        to take back."""
        failure: BaseException | None = None
        try:
            while self.pending:
                future, _ = self.pending.pop(0)
                try:
                    self.written.append(self.out.record(future.result()))
                except BaseException as error:  # the others are still recorded
                    failure = failure or error
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        if failure is not None:
            raise failure
        return self.written
