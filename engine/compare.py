"""Trace sources, pairing of captures, cell results and the first divergence."""

from __future__ import annotations

from dataclasses import dataclass

from engine.stats import DiffStats, TensorStats


@dataclass(frozen=True)
class Cell:
    """The comparison of one (layer, stage) between side A and side B.

    A side that does not produce the stage has `stats_x is None`; `diff` is None unless both
    sides have it with the same element count.
    """

    layer: int
    """Layer index, or WHOLE_MODEL_LAYER for `final_norm` / `lm_head`."""
    stage: str
    shape: tuple[int, ...]
    stats_a: TensorStats | None
    stats_b: TensorStats | None
    diff: DiffStats | None
