"""Run the parts of a comparison side by side: each side's pass ahead in its own thread.

A comparison does four kinds of work per cell: side A's pass, side B's pass, the statistics
of the pair and the local error of the checked side. Done one after the other they use one
core; most of each is numpy work that releases the GIL (matmuls, dequantization, the
sequential float64 scans of engine.stats), so they overlap well in threads.

`Ahead(iterator, depth)` drives an iterator (a source's `captures()` generator) in a daemon
thread and hands its items over through a queue of `depth` places: the pass runs up to `depth`
captures ahead of the consumer and then waits, so at most `depth` captures per side are held
besides the ones in use (the memory plan counts them: `IN_FLIGHT`). The thread's exceptions
are re-raised in the consumer; `close()` (or leaving the `with` block, or the consumer's
generator being closed) stops the thread at its next item and closes the iterator *in that
thread*, so a pass's cleanup runs where it was started. Nothing waits without a bound: the
producer re-checks the stop flag every WAIT_S while the queue is full, and `close` waits at
most JOIN_S for the thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

WAIT_S = 0.05
"""How often a producer with a full queue looks at the stop flag."""

JOIN_S = 5.0
"""How long `close` waits for a producer to finish the item it is computing."""

IN_FLIGHT = 2
"""Captures a side's pass may run ahead of the comparison (queue places per side)."""

_END = object()

_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMITER: Any = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_threads_for_pipeline() -> int:
    """BLAS threads per call while a pipeline runs: a quarter of this process's cores, at least
    one (about four threads call BLAS at once: two passes, statistics, local error)."""
    return max(1, available_cores() // 4)


BLAS_THREADS_ENV = "APR_TUI_BLAS_THREADS"
"""The BLAS threads a large pass may use, set by the command line when it starts OpenBLAS with
one thread (aprtui.cli._defer_blas_threads); unset, a large pass leaves BLAS as it found it."""

SMALL_PASS_FLOPS = 5e8
"""Matmul FLOPs per layer below which a single pass runs BLAS on one thread (SmolLM2: ~70
tokens). Measured on the 2-core machine, one BLAS thread vs OpenBLAS's two, wall (CPU):
37 tokens, `--save-tensor all` 0.89 s (0.87) vs 1.19-1.31 s (1.84); 37 tokens, three stages
0.67 s (0.66) vs 0.63-0.82 s (1.04-1.35). From 256 tokens on the matmuls pay for the second
thread (three stages: 1.0 s vs 1.4 s), though a run that writes every stage still gains from
one thread up to ~512 tokens (its file writer wants the other core); the threshold takes the
cautious side. Below it the threads' spinning between calls only takes a core from the
decoder and the file writer."""


def layer_matmul_flops(config: Any, seq_len: int) -> float:
    """A layer's matmul FLOPs: 2 × seq × its matrices' elements."""
    return 2.0 * seq_len * config.layer_weight_count


@contextlib.contextmanager
def pass_blas(config: Any, seq_len: int) -> Iterator[None]:
    """One BLAS thread for a single pass whose matmuls are small (SMALL_PASS_FLOPS), else
    the threads BLAS_THREADS_ENV allows (OpenBLAS's own threading where it is not set); the
    same reference-counted limit as `pipeline_blas`."""
    threads = 1
    if layer_matmul_flops(config, seq_len) >= SMALL_PASS_FLOPS:
        allowed = os.environ.get(BLAS_THREADS_ENV, "")
        if not allowed.isdigit() or int(allowed) < 1:
            yield
            return
        threads = int(allowed)
    with _limited_blas(threads):
        yield


@contextlib.contextmanager
def pipeline_blas() -> Iterator[None]:
    """Limit BLAS's own threads (OpenBLAS spins them between calls) while a pipeline runs.

    Measured on the 2-core machine: a SmolLM2 bisect took 2.3 s of CPU with one BLAS thread
    and 11-14 s with OpenBLAS's default two, its idle threads spinning against the pipeline's.
    The limit is process-wide, so it is reference-counted: the first pipeline sets it, the last
    one to finish restores what was there.
    """
    with _limited_blas(blas_threads_for_pipeline()):
        yield


def _started_on_one_thread() -> bool:
    """Whether BLAS is OpenBLAS loaded with OPENBLAS_NUM_THREADS=1 (aprtui.cli sets it before
    numpy loads): then, with no user raising it, BLAS runs one thread already, and a limit of
    one needs neither threadpoolctl's import nor its scan of the loaded libraries (~11 ms of
    every short trace)."""
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        return False
    try:
        from numpy.__config__ import CONFIG

        return "openblas" in CONFIG["Build Dependencies"]["blas"]["name"]
    except (ImportError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _limited_blas(threads: int) -> Iterator[None]:
    """BLAS limited to `threads` until the last of the nested users leaves."""
    global _BLAS_USERS, _BLAS_LIMITER
    with _BLAS_LOCK:
        if _BLAS_USERS == 0 and not (threads == 1 and _started_on_one_thread()):
            from threadpoolctl import threadpool_limits

            _BLAS_LIMITER = threadpool_limits(threads, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMITER is not None:
                _BLAS_LIMITER.restore_original_limits()
                _BLAS_LIMITER = None


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Ahead(Generic[T]):
    """Iterate `source` in a background thread, at most `depth` items ahead of the reader."""

    def __init__(self, source: Iterator[T], depth: int = IN_FLIGHT, name: str = "ahead") -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Hand one item over; False when the reader has gone (stop set)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    break
        except BaseException as error:  # handed to the reader, never lost in the thread
            self._put(_Raised(error))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # the reader learns of errors in items
                    close()
            self._put(_END)

    def __iter__(self) -> Ahead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer and wait (at most JOIN_S) for it to close its iterator."""
        self._done = True
        self._stop.set()
        while True:  # free a producer blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_S)

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
