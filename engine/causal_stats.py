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
from typing import Any

import numpy as np

from engine.backend import to_host
from engine.stats import (
    DiffAccumulator,
    DiffStats,
    StatsAccumulator,
    TensorStats,
    TopDiff,
    _accumulate,
    _top_k_no_nan,
    blocks_of,
)


@functools.lru_cache(maxsize=4)
def causal_square(seq: int) -> np.ndarray:
    """[seq, seq] bool: True where key j <= query i (the entries a causal model computes)."""
    return np.tril(np.ones((seq, seq), dtype=bool))


def causal_entries(array: np.ndarray, seq: int) -> np.ndarray:
    """The causal entries of a flat `[heads, seq, seq]` float32 array, in payload order:
    `[heads · seq (seq + 1) / 2]`."""
    heads = array.size // (seq * seq)
    return array.reshape(heads, seq, seq)[:, causal_square(seq)].reshape(-1)


def full_index(compact: int, seq: int) -> int:
    """Flat `[heads, seq, seq]` index of the `compact`-th causal entry."""
    per_head = seq * (seq + 1) // 2
    head, t = divmod(compact, per_head)
    row = (math.isqrt(8 * t + 1) - 1) // 2  # row i starts at i (i + 1) / 2
    column = t - row * (row + 1) // 2
    return (head * seq + row) * seq + column


def has_future(size: int, seq: int | None) -> bool:
    """True when `size` values are a `[heads, seq, seq]` tensor with a future to leave out."""
    return seq is not None and seq >= 2 and size > 0 and size % (seq * seq) == 0


def causal_tensor_stats(compact: np.ndarray, future: int) -> TensorStats:
    """`tensor_stats` of the zeroed tensor from its causal entries and its `future` zeros."""
    acc = StatsAccumulator()
    acc.add(compact)
    return with_zeros(acc, future)


def with_zeros(acc: StatsAccumulator, future: int) -> TensorStats:
    """The accumulator's statistics with `future` zeros folded in."""
    acc.add_zeros(future)
    return acc.result()


def causal_pair_stats(
    x: np.ndarray, y: np.ndarray, seq: int, limit: int = 10
) -> tuple[TensorStats, TensorStats, DiffStats] | None:
    """(stats of x, stats of y, diff stats) of two flat `[heads, seq, seq]` float32 host arrays
    under the zeroed-future convention, or None when the plain path must decide (see the
    module docstring)."""
    n = int(x.size)
    if n != int(y.size) or not has_future(n, seq):
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


# ------------------------------------------------------------------------------ streamed pairs
#
# A long prompt's attention arrives as blocks of query rows (engine.attention.AttentionStage,
# a trace directory's long attention file): `[rows, seq]` for rows [start, stop) of one head.
# Rows [start, stop) can see keys [0, stop) only, and within those the causal triangle: the
# same statistics as above, a block at a time, with the blocks' causal entries fed to the
# streamed accumulators (their top-K candidates mapped back to flat indices) and the future's
# zeros counted, and offered as top-K candidates at d = 0 by their lowest indices.


def causal_block(start: int, stop: int) -> np.ndarray:
    """[rows, stop] bool: True where key j <= query i, for query rows [start, stop)."""
    return np.arange(stop)[None, :] <= np.arange(start, stop)[:, None]


class _Fallback(Exception):
    """The plain streamed path must decide (a NaN, or blocks that are not whole rows)."""


def _row_block_entries(block: Any, offset: int, seq: int) -> tuple[int, int, np.ndarray]:
    """(first row, rows, the block as host float32 [rows, seq]) of an attention block."""
    flat = np.asarray(to_host(block), dtype=np.float32).reshape(-1)
    rest = offset % (seq * seq)
    if rest % seq or flat.size % seq or rest // seq + flat.size // seq > seq:
        raise _Fallback
    return rest // seq, flat.size // seq, flat.reshape(-1, seq)


def _compact_index(offset: int, start: int, rows: int, seq: int):
    """Map positions in a block's causal entries (row-major over `causal_block`) to flat
    indices: row r of the block holds start + r + 1 entries."""
    r = np.arange(rows + 1, dtype=np.int64)
    row_starts = r * start + r * (r + 1) // 2  # [rows + 1] first entry of each row

    def index_of(local: np.ndarray) -> np.ndarray:
        row = np.searchsorted(row_starts, local, side="right") - 1
        return offset + row * seq + (local - row_starts[row])

    return index_of


def _first_future(offset: int, start: int, rows: int, seq: int, k: int) -> np.ndarray:
    """The lowest (up to k) flat indices of the block's future entries (key j > query i)."""
    found: list[int] = []
    for r in range(rows):
        first_key = start + r + 1
        take = min(seq - first_key, k - len(found))
        if take > 0:
            base = offset + r * seq + first_key
            found.extend(range(base, base + take))
        if len(found) >= k:
            break
    return np.asarray(found, dtype=np.int64)


def causal_streamed_pair_stats(
    x: Any, y: Any, seq: int, limit: int = 10
) -> tuple[TensorStats, TensorStats, DiffStats] | None:
    """`causal_pair_stats` for a pair of which a side is a lazy capture (`.blocks()`): one
    block per side at a time; None when the plain streamed path must decide."""
    n = int(x.size)
    if n != int(y.size) or not has_future(n, seq):
        return None
    guide = x if hasattr(x, "blocks") else y
    stats_a, stats_b, diff = StatsAccumulator(), StatsAccumulator(), DiffAccumulator(limit)
    future = 0
    try:
        for (offset, block_a), (_, block_b) in zip(
            blocks_of(x, guide), blocks_of(y, guide), strict=True
        ):
            start, rows, a = _row_block_entries(block_a, offset, seq)
            _, _, b = _row_block_entries(block_b, offset, seq)
            stop = start + rows
            mask = causal_block(start, stop)  # [rows, stop]
            ca, cb = a[:, :stop][mask], b[:, :stop][mask]  # causal entries, payload order
            with np.errstate(all="ignore"):
                if np.isnan(ca - cb).any():
                    raise _Fallback
            stats_a.add(ca)
            stats_b.add(cb)
            diff.add(offset, ca, cb, index_of=_compact_index(offset, start, rows, seq))
            block_future = rows * seq - int(ca.size)
            future += block_future
            if block_future:
                diff.add_zero_pairs(block_future, _first_future(offset, start, rows, seq, diff.k))
    except _Fallback:
        return None
    return with_zeros(stats_a, future), with_zeros(stats_b, future), diff.result()
