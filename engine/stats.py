"""Tensor statistics (`apr trace` semantics) and A-vs-B diff statistics (`apr diff --values`).

The numeric contract, shared/reference/aprender-formats.md §2.3 and §3.2. Works on numpy and CuPy
arrays alike; results are plain Python numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorStats:
    """`apr trace` statistics of one tensor, plus its L2 norm and max |x|."""

    count: int
    nan_count: int
    inf_count: int
    zero_count: int
    min: float
    """Over finite values; +inf when none is finite, 0.0 for an empty tensor."""
    max: float
    mean: float
    std: float
    """Sample standard deviation over finite values; 0.0 when fewer than 2."""
    l2_norm: float
    max_abs: float


@dataclass(frozen=True)
class TopDiff:
    index: int
    a: float
    b: float
    abs_diff: float


@dataclass(frozen=True)
class DiffStats:
    """`apr diff --values` statistics of two equal-length tensors."""

    count: int
    max_abs_diff: float
    max_abs_diff_index: int
    rms_diff: float
    cosine_sim: float
    top_diffs: tuple[TopDiff, ...]
