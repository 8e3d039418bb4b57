"""The trace-source interface: one side of a comparison.

A *trace source* is anything that yields stage captures in computation order (layer, then apr's
canonical stage index, whole-model stages last) and can hand back one full tensor on request:
our forward pass over a model file (`engine.sources.model_run`), a directory of APRT stage files
(`engine.sources.trace_dir`), and the foreign runtimes beside them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from engine.forward import Capture


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
        """The full host float32 tensor of one (layer, stage), or None if this side lacks it."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TraceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
