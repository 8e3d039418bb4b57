"""Our own forward pass over a model file as a trace source.

`ModelSource` runs `engine.forward.trace` on a fixed token sequence and keeps a bounded cache of
host copies for drill-down; a tensor that fell out of the cache is recomputed (one layer's pass).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from engine.backend import Backend, resolve_backend, to_host
from engine.forward import Capture, produced_stages, trace
from engine.model import Model
from engine.pipeline import pass_blas
from engine.recent_weights import RecentWeights, reuse_budget
from engine.sources.base import CACHE_BYTES, TensorCache, TraceSource, rerun_span
from engine.stages import STAGE_BY_NAME


class ModelSource(TraceSource):
    """A model run through engine.forward.trace on a fixed token sequence."""

    kind = "model"

    def __init__(
        self,
        model: Model,
        token_ids: list[int],
        *,
        prompt: str | None = None,
        tokens_explicit: bool = False,
        backend: str | Backend = "numpy",
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        # The pass, the local error and drill-down recomputes share decoded weights.
        self.model = replace(
            model, weights=RecentWeights(model.weights, reuse_budget(model.config))
        )
        self.config = model.config
        self.token_ids = list(token_ids)
        self.prompt = prompt
        self.tokens_explicit = tokens_explicit
        """True when the caller fixed the tokens (--tokens or --prompt); False for the default."""
        self.backend = resolve_backend(backend)
        self.num_layers = model.config.num_layers
        self.stages = produced_stages(model.config)
        self.label = model.path.name or str(model.path)
        self.description = (
            f"{model.path} ({model.format}, {model.config.architecture}, "
            f"{model.config.num_layers} layers, {self.backend.device_name})"
        )
        self._cache = TensorCache(cache_bytes)

    def adopt_tokens(self, token_ids: list[int], prompt: str | None = None) -> None:
        """Trace these ids instead of the default prompt's (a reference's tokens.json)."""
        self.token_ids = list(token_ids)
        self.prompt = prompt
        self._cache.clear()

    def captures(
        self,
        layers: range | None = None,
        cancel: threading.Event | None = None,
        whole_model: bool = True,
    ) -> Iterator[Capture]:
        stage_names = [s for s in self.stages if whole_model or STAGE_BY_NAME[s].per_layer]
        for capture in trace(
            self.model,
            self.token_ids,
            backend=self.backend,
            stages=stage_names,
            layers=layers,
            cancel=cancel,
            keep_logits=whole_model,  # the logit metrics of a comparison read them
            # The local error has the second core (measured, bisect of SmolLM2 against its Q8_0
            # copy: children decoding 0.95 s of weights saved the pass 0.25 s, no wall time).
            decode_ahead=False,
        ):
            self._remember(capture)
            yield capture

    def tensor(self, layer: int, stage_name: str) -> np.ndarray | None:
        """The capture as a host array, or for a long prompt's attention stage the lazy
        capture itself (engine.attention.AttentionStage: `.blocks()`), never materialised."""
        if stage_name not in self.stages:
            return None
        cached = self._cache.get((layer, stage_name))
        if cached is not None:
            return cached
        span = rerun_span(self.num_layers, layer, stage_name)
        if span is None:
            return None
        layers, _ = span
        # A drill-down's rerun is a pass of its own: BLAS threads as a trace would use them
        # (within a running comparison the comparison's limit stays: engine.pipeline).
        with pass_blas(self.config, len(self.token_ids)):
            for capture in trace(
                self.model,
                self.token_ids,
                backend=self.backend,
                stages=[stage_name],
                layers=layers,
            ):
                self._remember(capture)
                if hasattr(capture.array, "blocks"):  # a long prompt's attention: by blocks
                    return capture.array
                return np.asarray(to_host(capture.array), dtype=np.float32)
        return None

    def _remember(self, capture: Capture) -> None:
        """Keep a host copy of the capture for drill-down while it fits the cache budget
        (never a lazy attention capture: it is recomputed by blocks when asked for)."""
        if hasattr(capture.array, "blocks"):
            return
        if int(capture.array.nbytes) <= self._cache.limit:
            host = np.asarray(to_host(capture.array), dtype=np.float32)
            self._cache.put((capture.layer, capture.stage), host)

    def close(self) -> None:
        self._cache.clear()
        self.model.close()
