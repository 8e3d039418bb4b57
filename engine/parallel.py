"""Share one big numpy job among the machine's cores: its chunks, claimed one at a time.

Decoding a quantized tensor is a loop of vectorised numpy calls over 1 MiB chunks, each of which
releases the GIL, so two threads decoding parts of the same matrix run at once. Measured on the
2-core development machine (min of 8): the 210 layer matrices of SmolLM2 (Q4_1) decode in
0.255 s on two threads against 0.306 s on one. But every job wakes a sleeping worker, and on a
virtual machine whose host is busy a wake-up is dear: in a whole SmolLM2 `trace` the shared
small matrices cost more than they saved (engine.formats.quant.PARALLEL_DECODE_MIN_VALUES), so
only tensors of millions of values (an embedding table, a 7B model's matrices) are shared.

The threads claim the chunks one at a time from a shared counter, rather than each taking a
fixed share: on a virtual machine whose host takes a core away for a while (CPU steal, 20-40 %
of the time on the development machine when the host is busy), or when another of our threads
is busy on the same core, a fixed half waits for its slowed thread while the other thread
idles; claimed chunks go to whichever thread is free.

The caller's thread claims chunks too and waits for the others at the end, so a job never
waits for a free worker that is waiting for it (workers run only leaf work), and a pool of
PARALLEL_THREADS - 1 workers serves every caller: the two sides of a comparison, each in its own
thread, share it. Results land in arrays the work writes into; nothing is copied or gathered.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")

PARALLEL_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads that share one job (the caller's included): the cores, at most four (past four the
decoders are bound by memory bandwidth, not arithmetic). Set it to 1 to run every job serially."""

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    """The shared pool of PARALLEL_THREADS - 1 worker threads, started on first use (and again,
    bigger, if PARALLEL_THREADS has grown since: the old pool finishes its jobs and ends)."""
    global _pool, _pool_size
    with _pool_lock:
        wanted = max(1, PARALLEL_THREADS - 1)
        if _pool is None or _pool_size < wanted:
            previous = _pool
            _pool = ThreadPoolExecutor(max_workers=wanted, thread_name_prefix="apr-tui-chunks")
            _pool_size = wanted
            if previous is not None:
                previous.shutdown(wait=False)
        return _pool


_busy_lock = threading.Lock()
_busy_workers = 0
"""Pool workers that a job holds. A job takes the workers that are idle and does the rest
itself: when both sides of a comparison decode at once (each in its own thread), the one that
finds the worker taken decodes alone instead of queueing behind the other side's chunks and
waiting for them, idle (measured: ~0.35 s of such waiting in a 37-token bisect)."""


def _take_workers(wanted: int) -> int:
    """Claim up to `wanted` idle workers (PARALLEL_THREADS - 1 in all); how many were taken."""
    global _busy_workers
    with _busy_lock:
        taken = max(0, min(wanted, PARALLEL_THREADS - 1 - _busy_workers))
        _busy_workers += taken
        return taken


def _return_workers(count: int) -> None:
    global _busy_workers
    with _busy_lock:
        _busy_workers -= count


def parallel_chunks(work: Callable[[Sequence[Item]], None], items: Sequence[Item]) -> None:
    """Call `work` on every item of `items` and return when all are done: the caller's thread
    and the idle workers each claim the next unclaimed item (`work(items[i : i + 1])`) until
    none is left; with no idle worker the caller does them all in one call, `work(items)`. The
    first exception raised by any call is raised here, after every thread has stopped (no
    thread is still writing into the caller's arrays); once one call has failed, no thread
    claims another item."""
    helpers = _take_workers(min(PARALLEL_THREADS, len(items)) - 1)  # besides the caller
    if helpers == 0:
        work(items)
        return
    try:
        claim = _Claims(len(items))

        def drain() -> None:
            while (index := claim.next()) is not None:
                try:
                    work(items[index : index + 1])
                except BaseException:
                    claim.stop()
                    raise

        futures: list[Future] = [_workers().submit(drain) for _ in range(helpers)]
        error: BaseException | None = None
        try:
            drain()
        except BaseException as raised:  # wait for the others before raising
            error = raised
        for future in futures:
            try:
                future.result()
            except BaseException as raised:
                error = error or raised
    finally:
        _return_workers(helpers)
    if error is not None:
        raise error


class _Claims:
    """The next unclaimed index of a job, handed out under a lock; `stop` ends the handing."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._next = 0
        self._count = count

    def next(self) -> int | None:
        with self._lock:
            if self._next >= self._count:
                return None
            index = self._next
            self._next += 1
            return index

    def stop(self) -> None:
        with self._lock:
            self._next = self._count
