"""Statistics of a causal attention pair from its causal entries alone.

`attn_scores` and `attn_softmax` are `[heads, seq, seq]` and compared under apr's convention:
every entry above the diagonal (a query's future keys) counts as 0.0 on both sides
(engine.compare.future_to_zero). Nearly half of each tensor is then zeros that are known
before anything is read, yet the plain path builds the zeroed copy of both sides, scans the
zero pairs again to leave them out of the sums, and runs the tensor statistics over all of it.

Here only the causal entries (key j <= query i, `seq (seq + 1) / 2` a head) are gathered, in
payload order, and every statistic of the whole zeroed tensor follows from theirs:

* diff sums (sum d², a·b, ‖a‖², ‖b‖²): exact, bit for bit. They are apr's left-to-right float64
  sums, and a pair of zeros adds ±0.0 to each, which leaves a running sum unchanged; the causal
  entries keep their order (engine.stats._accumulate skips zero pairs the same way);
* max |a - b| and its index: the first maximum among the causal entries, mapped back to its
  flat index (a future entry has d = 0, so it can only be the first maximum when every d is 0,
  and then the answer is index 0 in both paths);
* top-K: the K largest d with ties by ascending index. When at least K causal entries have
  d > 0, the zeros of the future never enter, and the index map is increasing, so the order
  is the same;
* tensor statistics: those of the causal entries with a block of `heads × seq (seq - 1) / 2`
  zeros folded in (counts, min, max and Chan's update of mean and variance), equal to the
  whole-array values to float64 rounding, as engine.stats' chunked statistics are.

Anything else goes back to the plain path (`None`): a NaN in d (apr's NaN ordering depends on
positions), fewer than K positive differences (the zeros of the future would join the top-K),
or a size that is not `heads × seq × seq`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from engine.stats import (
    DiffStats,
    StatsAccumulator,
    TensorStats,
    TopDiff,
    _accumulate,
    _top_k_no_nan,
)


@functools.lru_cache(maxsize=4)
def causal_mask(seq: int) -> np.ndarray:
    """[seq, seq] bool: True where key j <= query i (the entries a causal model computes)."""
    return np.tril(np.ones((seq, seq), dtype=bool))


def causal_entries(array: np.ndarray, seq: int) -> np.ndarray:
    """The causal entries of a flat `[heads, seq, seq]` float32 array, in payload order:
    `[heads · seq (seq + 1) / 2]`."""
    heads = array.size // (seq * seq)
    return array.reshape(heads, seq, seq)[:, causal_mask(seq)].reshape(-1)


def full_index(compact: int, seq: int) -> int:
    """Flat `[heads, seq, seq]` index of the `compact`-th causal entry."""
    per_head = seq * (seq + 1) // 2
    head, t = divmod(compact, per_head)
    row = (math.isqrt(8 * t + 1) - 1) // 2  # row i starts at i (i + 1) / 2
    column = t - row * (row + 1) // 2
    return (head * seq + row) * seq + column


def fits(size: int, seq: int | None) -> bool:
    """True when `size` values are a `[heads, seq, seq]` tensor with a future to leave out."""
    return seq is not None and seq >= 2 and size > 0 and size % (seq * seq) == 0


def causal_tensor_stats(compact: np.ndarray, future: int) -> TensorStats:
    """`tensor_stats` of the zeroed tensor from its causal entries and its `future` zeros."""
    acc = StatsAccumulator()
    acc.add(compact)
    if future:
        acc.count += future
        acc.zero += future
        merged = acc.valid + future  # a block of zeros: mean 0, no squared deviations
        acc.m2 += acc.mean * acc.mean * acc.valid * future / merged
        acc.mean -= acc.mean * future / merged
        acc.valid = merged
        acc.min, acc.max = min(acc.min, 0.0), max(acc.max, 0.0)
    return acc.result()


def causal_pair_stats(
    x: np.ndarray, y: np.ndarray, seq: int, limit: int = 10
) -> tuple[TensorStats, TensorStats, DiffStats] | None:
    """(stats of x, stats of y, diff stats) of two flat `[heads, seq, seq]` float32 host arrays
    under the zeroed-future convention, or None when the plain path must decide (see the
    module docstring)."""
    n = int(x.size)
    if n != int(y.size) or not fits(n, seq):
        return None
    a, b = causal_entries(x, seq), causal_entries(y, seq)  # [heads · seq (seq + 1) / 2]
    future = n - int(a.size)
    with np.errstate(all="ignore"):
        d = np.abs(a - b)  # float32, as diff_stats
        if np.isnan(d).any():
            return None
        k = min(max(limit, 1), n)
        if int(np.count_nonzero(d)) < k:
            return None
        sum_sq_diff, dot, norm_a_sq, norm_b_sq = _accumulate(a, b, d, np)
        rms_diff = float(np.float32(math.sqrt(sum_sq_diff / n)))
    if norm_a_sq > 0.0 and norm_b_sq > 0.0:
        cosine_sim = dot / (math.sqrt(norm_a_sq) * math.sqrt(norm_b_sq))
    else:
        cosine_sim = 0.0
    top = _top_k_no_nan(d, k, np)  # compact indices, d descending, ties by index
    top_diffs = tuple(
        TopDiff(full_index(int(i), seq), float(a[i]), float(b[i]), float(d[i])) for i in top
    )
    diff = DiffStats(
        count=n,
        max_abs_diff=top_diffs[0].abs_diff,  # the first maximum: top-K's first entry
        max_abs_diff_index=top_diffs[0].index,
        rms_diff=rms_diff,
        cosine_sim=cosine_sim,
        top_diffs=top_diffs,
    )
    return causal_tensor_stats(a, future), causal_tensor_stats(b, future), diff
