"""The traced forward pass: one prefill, no KV cache, one capture per (layer, stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Capture:
    """One stage tensor as soon as the forward pass has it.

    `array` is float32 in apr's flat token-major layout (§5), on the backend's device (numpy or
    CuPy); `shape` is its logical shape, e.g. (seq, hidden) or (heads, seq, seq) or (vocab,).
    """

    layer: int
    """Layer index; 0 for `embedding`; WHOLE_MODEL_LAYER for `final_norm` and `lm_head`."""
    stage: str
    array: Any
    shape: tuple[int, ...]
