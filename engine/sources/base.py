"""The trace-source interface: one side of a comparison.

A *trace source* is anything that yields stage captures in computation order (layer, then apr's
canonical stage index, whole-model stages last) and can hand back one full tensor on request:
our forward pass over a model file (`engine.sources.model_run`), a directory of APRT stage files
(`engine.sources.trace_dir`), and the foreign runtimes beside them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from engine.forward import Capture
from engine.stages import STAGE_BY_NAME, WHOLE_MODEL_LAYER

CACHE_BYTES = 64 * 1024 * 1024
"""Host bytes of full tensors a running source keeps for drill-down before evicting the oldest."""


class TensorCache:
    """Full tensors by (layer, stage), least recently used evicted past a byte budget;
    thread-safe (the engine worker fills it, drill-down workers read it)."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._arrays: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> np.ndarray | None:
        with self._lock:
            if key not in self._arrays:
                return None
            self._arrays.move_to_end(key)
            return self._arrays[key]

    def put(self, key: tuple[int, str], values: np.ndarray) -> None:
        """Keep `values` unless it alone is over the budget; evict the oldest past it."""
        if values.nbytes > self.limit:
            return
        with self._lock:
            if key not in self._arrays:
                self._arrays[key] = values
                self._bytes += values.nbytes
            while self._bytes > self.limit:
                _, evicted = self._arrays.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held now (never above `limit`)."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()
            self._bytes = 0


def in_run(layer: int, layers: range | None, whole_model: bool) -> bool:
    """Whether a capture of `layer` belongs to a run over `layers` (None: every layer), with or
    without the whole-model stages: the filter every stored source applies to its entries."""
    if layer == WHOLE_MODEL_LAYER:
        return whole_model
    return layers is None or layer in layers


def rerun_span(num_layers: int, layer: int, stage_name: str) -> tuple[range, bool] | None:
    """The run that produces one (layer, stage) again: (layers, whole_model), or None when a
    source of `num_layers` layers cannot have it (the embedding exists at layer 0 only)."""
    if STAGE_BY_NAME[stage_name].per_layer:
        if not 0 <= layer < num_layers or (stage_name == "embedding" and layer != 0):
            return None
        return range(layer, layer + 1), False
    if layer != WHOLE_MODEL_LAYER:
        return None
    return range(0), True


class TraceSource:
    """One side of a comparison. Subclasses: ModelSource, DirectorySource."""

    kind: str = ""
    """`model` or `trace-dir`."""
    label: str
    """Short name for headers: the file or directory name."""
    description: str
    """One line: what it is, how it runs."""
    token_ids: list[int] | None
    num_layers: int
    stages: tuple[str, ...]
    """The stages this source can produce, in computation order."""

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        raise NotImplementedError

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        """The full host float32 tensor of one (layer, stage), or None if this side lacks it.

        A long prompt's attention stage may come back as a lazy capture instead (`.blocks()`,
        `.shape`, `.size`, as engine.attention.AttentionStage): consumers read it a block at a
        time (engine.drill, engine.aprt.write_aprt) or call np.asarray when they truly need it
        whole."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TraceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplayingSource(TraceSource):
    """A source that runs an engine and can only hand back a tensor by keeping it
    (`self._cache`, a TensorCache) or by running the part of the pass that produces it again
    (its own `captures`): llama.cpp and HF transformers."""

    _cache: TensorCache

    def _yield_layers(
        self, stream: Iterator[tuple[int, list]], cancel: threading.Event | None
    ) -> Iterator[Capture]:
        """Captures from the engine's (layer, [(stage, values), ...]) hand-overs: only stages
        this source produces, each kept for drill-down; stops between layers on cancel."""
        for layer, stages in stream:
            for stage_name, values in stages:
                if stage_name not in self.stages:
                    continue
                self._remember(layer, stage_name, values)
                yield Capture(layer, stage_name, values, tuple(values.shape))
            if cancel is not None and cancel.is_set():
                return

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        if stage_name not in self.stages:
            return None
        key = (layer, stage_name)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        span = rerun_span(self.num_layers, layer, stage_name)
        if span is None:
            return None
        layers, whole_model = span
        found = None
        for capture in self.captures(layers=layers, whole_model=whole_model):
            if (capture.layer, capture.stage) == key:
                found = capture.array
        return found

    def _remember(self, layer: int, stage_name: str, values: np.ndarray) -> None:
        self._cache.put((layer, stage_name), values)
