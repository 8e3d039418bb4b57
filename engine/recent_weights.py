"""Weights decoded once per comparison: the most recently decoded matrices, kept for a while.

In a comparison the same weight is asked for more than once: the checked side's pass decodes
it for its matmul, then the local error (engine.local_error) recomputes the stage from the
same weights a few captures later, and the explorer's drill-down may recompute a layer just
shown. Dequantizing a Q4/Q8 matrix costs more than the matmul that uses it (SmolLM2 at 37
tokens: 0.3 s of a 2 s bisect went to decoding the same weights a second time).

`RecentWeights(store, limit)` is a WeightStore that keeps what `get` decoded, least recently
used first out, within `limit` bytes, so the second request is a lookup. Arrays it returns are
read-only (shared between the pass and the local error; an in-place edit would corrupt the
other's input, so it raises instead). Rows (`get_rows`, the embedding lookup and the blocked
lm_head) are not kept: they are a slice of a table that is never decoded whole.

Memory: at most `limit` bytes beyond what the pass holds anyway: `reuse_budget(config)`, two
layers' weights (the local error trails its pass by less than a layer), never more than
RECENT_WEIGHT_BYTES. SmolLM2: 27 MB. A 7B model's matrices (up to 180 MB) mostly do not fit,
so its local error decodes them again, which costs time, never memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

RECENT_WEIGHT_BYTES = 256 << 20
"""The most bytes of decoded weights a comparison keeps for reuse (per model)."""


def reuse_budget(config: Any) -> int:
    """Two layers of float32 weights (attention and MLP matrices), capped at
    RECENT_WEIGHT_BYTES: what the local error can still ask for after its pass decoded it."""
    return min(RECENT_WEIGHT_BYTES, 2 * 4 * config.layer_weight_count)


class RecentWeights:
    """A WeightStore that remembers the matrices it decoded last, within a byte budget."""

    def __init__(self, store: Any, limit: int = RECENT_WEIGHT_BYTES) -> None:
        self.store = store
        self.limit = limit
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the pass and the local error run in two threads

    def names(self) -> list[str]:
        return self.store.names()

    def has(self, name: str) -> bool:
        return self.store.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.store.shape(name)

    def get(self, name: str) -> np.ndarray:
        with self._lock:
            kept = self._kept.get(name)
            if kept is not None:
                self._kept.move_to_end(name)
                return kept
        return self.adopt(name, self.store.get(name))  # decoded outside the lock

    @property
    def decoding_store(self) -> Any:
        """The store that decodes (engine.prefetch's child decodes with it, not through this
        cache: a forked child must not take a lock another thread may have held)."""
        return self.store

    def adopt(self, name: str, value: np.ndarray) -> np.ndarray:
        """Keep `value`, the decoded `name` (by this thread or by engine.prefetch's child), as
        `get` keeps what it decodes; returned read-only."""
        value.flags.writeable = False
        if value.nbytes <= self.limit:
            with self._lock:
                if name not in self._kept:
                    self._kept[name] = value
                    self._bytes += value.nbytes
                while self._bytes > self.limit:
                    _, dropped = self._kept.popitem(last=False)
                    self._bytes -= dropped.nbytes
        return value

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        from engine.model import weight_rows

        return weight_rows(self.store, name, start, stop)

    @property
    def nbytes(self) -> int:
        """Bytes kept now (never above `limit`)."""
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._kept.clear()
            self._bytes = 0
        self.store.close()

    def __getattr__(self, attribute: str) -> Any:
        """Anything else a format's store offers (its path, tensor records) is the store's."""
        return getattr(self.store, attribute)
