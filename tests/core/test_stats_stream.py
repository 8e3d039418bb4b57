"""Streaming statistics (engine.stats accumulators) against the one-array functions.

The one-array `diff_stats` is itself checked against a Python loop in tests/core/test_stats.py;
here the streamed results must equal it exactly (diff statistics) or to float64 rounding
(mean / std / L2 of tensor statistics), over block splits chosen to cross ties and maxima.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.stats import (
    DiffAccumulator,
    StatsAccumulator,
    diff_stats,
    streamed_pair_stats,
    tensor_stats,
)


class Blocked:
    """A stand-in lazy capture: the array served as (offset, block) pairs of `step` values."""

    def __init__(self, array: np.ndarray, step: int) -> None:
        self.array, self.step = array, step
        self.size, self.shape = array.size, array.shape

    def blocks(self):
        flat = self.array.reshape(-1)
        for start in range(0, flat.size, self.step):
            yield start, flat[start : start + self.step]


def _diff_in_blocks(a, b, step, limit=10):
    acc = DiffAccumulator(limit)
    for start in range(0, a.size, step):
        acc.add(start, a[start : start + step], b[start : start + step])
    return acc.result()


@pytest.mark.parametrize("step", [1, 7, 64, 1000, 5000])
def test_streamed_diff_equals_one_array_diff_exactly(step):
    rng = np.random.default_rng(step)
    a = rng.standard_normal(3001).astype(np.float32)
    b = a + rng.standard_normal(3001).astype(np.float32) * np.float32(1e-3)
    # ties in |a - b| across block edges: the lower index must win, as in a stable sort
    b[[5, 700, 2999]] = a[[5, 700, 2999]] + np.float32(0.5)
    b[[6, 1400]] = a[[6, 1400]] - np.float32(0.5)
    assert _diff_in_blocks(a, b, step) == diff_stats(a, b)
    assert _diff_in_blocks(a, b, step, limit=3) == diff_stats(a, b, limit=3)


def test_streamed_diff_of_identical_and_zero_tensors():
    zeros = np.zeros(100, np.float32)
    assert _diff_in_blocks(zeros, zeros, 30) == diff_stats(zeros, zeros)
    x = np.linspace(-1, 1, 100, dtype=np.float32)
    assert _diff_in_blocks(x, x.copy(), 33) == diff_stats(x, x.copy())


@pytest.mark.parametrize("step", [1, 13, 500])
def test_streamed_tensor_stats_match(step):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1234) * 3 + 7).astype(np.float32)
    x[[3, 400]] = np.nan
    x[[10]] = np.inf
    x[[11, 12]] = 0.0
    acc = StatsAccumulator()
    for start in range(0, x.size, step):
        acc.add(x[start : start + step])
    got, expected = acc.result(), tensor_stats(x)
    exact = ("count", "nan_count", "inf_count", "zero_count", "min", "max", "max_abs")
    for field in exact:
        assert getattr(got, field) == getattr(expected, field), field
    for field in ("mean", "std", "l2_norm"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field), rel=1e-13)


def test_pair_stats_of_a_lazy_side_against_an_array():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 40, 40)).astype(np.float32)
    b = (a * np.float32(1.01)).astype(np.float32)
    for left, right in (
        (Blocked(a, 40 * 7), b),
        (a, Blocked(b, 40 * 7)),
        (Blocked(a, 40), Blocked(b, 40)),
    ):
        stats_a, stats_b, diff = streamed_pair_stats(left, right)
        assert diff == diff_stats(a, b)
        assert dataclasses.replace(stats_a, mean=0, std=0, l2_norm=0) == dataclasses.replace(
            tensor_stats(a), mean=0, std=0, l2_norm=0
        )
        assert stats_b.std == pytest.approx(tensor_stats(b).std, rel=1e-12)
    _, _, diff = streamed_pair_stats(Blocked(a, 40), np.zeros(5, np.float32))
    assert diff is None  # sizes differ


def test_large_diff_is_apr_exact_across_sum_chunks_and_topk_prefilter():
    """n = 200,003 (several 65,536-value sum chunks, the top-K prefilter path): the sums equal a
    Python left-to-right loop bit for bit, and the top 10 equal a stable argsort, with ties
    planted in different 1,024-value chunks."""
    rng = np.random.default_rng(5)
    n = 200_003
    a = rng.standard_normal(n).astype(np.float32)
    b = (a + rng.standard_normal(n).astype(np.float32) * np.float32(1e-2)).astype(np.float32)
    for index in (3, 5000, 150_001, 200_002):  # four equal largest differences
        b[index] = a[index] + np.float32(8.0)
    got = diff_stats(a, b, limit=10)
    d = np.abs(a - b)
    sum_sq = dot = 0.0
    for x, y, z in zip(a.tolist(), b.tolist(), d.tolist(), strict=True):
        sum_sq += z * z
        dot += x * y
    assert got.rms_diff == float(np.float32((sum_sq / n) ** 0.5))
    norm_a = float(np.sqrt(sum(v * v for v in a.tolist())))
    norm_b = float(np.sqrt(sum(v * v for v in b.tolist())))
    assert got.cosine_sim == dot / (norm_a * norm_b)
    expected_top = np.argsort(-d, kind="stable")[:10].tolist()
    assert [t.index for t in got.top_diffs] == expected_top
    assert expected_top[:4] == [3, 5000, 150_001, 200_002]


def test_large_diff_with_mostly_tied_differences():
    """Identical tensors (every |a - b| is 0) and a causal-attention-like pair (half the values
    exactly 0 on both sides): the top-K prefilter finds nothing to narrow and must fall back to
    the plain selection, giving the stable order (lowest indices first among ties)."""
    n = 200_000
    x = np.linspace(-1, 1, n, dtype=np.float32)
    same = diff_stats(x, x.copy())
    assert [t.index for t in same.top_diffs] == list(range(10)) and same.max_abs_diff == 0.0
    a = np.zeros(n, np.float32)
    b = np.zeros(n, np.float32)
    a[n // 2 :] = np.linspace(0, 1, n - n // 2, dtype=np.float32)
    b[n // 2 :] = a[n // 2 :]
    b[[n // 2 + 7, n - 1]] += np.float32(0.25)
    got = diff_stats(a, b)
    d = np.abs(a - b)
    assert [t.index for t in got.top_diffs] == np.argsort(-d, kind="stable")[:10].tolist()
