"""Hand items from a callback-driven run (llama.cpp's eval callback, torch hooks) to a generator.

Runtimes that report intermediate tensors through callbacks during one big call (`llama_decode`,
a torch forward) cannot be paused by a generator directly. The call runs on a worker thread and
each callback hands its item over a queue of size one, waiting until the consumer has taken it:
at most one item is in flight, so memory stays one item deep whatever the model's depth, and a
consumer that stops early (or sets `cancel`) makes the next hand-over return False, which the
run uses to stop. The generator's `finally` releases and joins the worker, so no thread outlives
the iteration.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

POLL_SECONDS = 0.05
"""How often a waiting side re-checks for cancellation (bounds the latency of stopping)."""

Emit = Callable[[Any], bool]
"""Hand one item to the consumer; False means stop the run (the consumer has gone)."""


def run_in_worker(
    run: Callable[[Emit], None],
    cancel: threading.Event | None = None,
    name: str = "trace-source",
) -> Iterator[Any]:
    """Yield every item `run(emit)` emits, in order; re-raise what `run` raised."""
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def cancelled() -> bool:
        return stop.is_set() or (cancel is not None and cancel.is_set())

    def emit(item: Any) -> bool:
        while not cancelled():
            try:
                handoff.put(("item", item), timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        outcome: Any = ("done", done)
        try:
            run(emit)
        except BaseException as error:  # handed to the consumer, raised there
            outcome = ("error", error)
        while not stop.is_set():
            try:
                handoff.put(outcome, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            try:
                kind, item = handoff.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not worker.is_alive() and handoff.empty():
                    return
                continue
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
