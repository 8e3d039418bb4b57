"""Decode the next weight while the current one is used: one background thread, one ahead.

A traced pass asks for weights in the same order in every layer (norm, q, k, v, o, norm, gate,
up, down). `WeightPrefetcher.get(name)` returns the weight and starts decoding the one that will
be asked for next in a background thread, so dequantization (numpy's vectorised decoders and
the page faults of the memory-mapped file, which release the GIL) overlaps the matmuls, the
statistics and the file writes of the stage before. The order is learned from the first layer:
names are keyed with their layer number replaced, and the key after the current one (or the
first key of the next layer) is the prediction. A wrong guess costs one wasted decode and
nothing else: a weight is always returned by the store's own `get`, bit for bit.

Memory: at most one predicted weight is held besides the one in use, so the peak grows by one
matrix, never by a layer.
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

PREFETCH_WEIGHTS = False
"""Off by default: measured on the 2-core development machine under load (other processes
busy), decoding ahead in a thread cost ~0.5 s of CPU per SmolLM2 trace and gained no wall time,
because OpenBLAS's own threads already occupy both cores and spin while the decoder runs. On a
machine with idle cores set it True (`engine.prefetch.PREFETCH_WEIGHTS = True`)."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

EXPERT = ".mlp.experts."
"""Mixture-of-experts weights are decoded only when a token routes to their expert (issue 12's
guarantee), so they are never predicted: which expert comes next is the router's answer."""


def _split(name: str) -> tuple[int, str] | None:
    match = _LAYER.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


class WeightPrefetcher:
    """`get(name)` of a WeightStore with the next layer weight decoded ahead in a thread."""

    def __init__(self, store: Any, num_layers: int) -> None:
        self.store = store
        self.num_layers = num_layers
        self.order: list[str] = []  # per-layer keys in the order layer 0 asked for them
        self.learned = False
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: tuple[str, Future] | None = None

    def get(self, name: str) -> np.ndarray:
        if not PREFETCH_WEIGHTS:
            return self.store.get(name)
        if self.ahead is not None and self.ahead[0] == name:
            _, future = self.ahead
            self.ahead = None
            value = future.result()
        else:
            self._drop_ahead()
            value = self.store.get(name)
        self._predict_after(name)
        return value

    def _predict_after(self, name: str) -> None:
        split = _split(name)
        if split is None:
            return
        layer, key = split
        if not self.learned:
            if layer == 0 and key not in self.order:
                self.order.append(key)
                return
            if layer == 0:
                return
            self.learned = bool(self.order)  # layer 1 reached: layer 0's order is complete
        if key not in self.order:
            return
        index = self.order.index(key) + 1
        if index < len(self.order):
            following = f"model.layers.{layer}.{self.order[index]}"
        elif layer + 1 < self.num_layers:
            following = f"model.layers.{layer + 1}.{self.order[0]}"
        else:
            return
        if EXPERT in following or not self.store.has(following):
            return  # routing decides which experts run: never decode one ahead of it
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-prefetch")
        self.ahead = (following, self.pool.submit(self.store.get, following))

    def _drop_ahead(self) -> None:
        if self.ahead is not None:
            _, future = self.ahead
            self.ahead = None
            future.cancel() or future.exception()  # wait: never leave a read running

    def close(self) -> None:
        """Wait for a decode in flight (the store may be closed next) and stop the thread."""
        self._drop_ahead()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
