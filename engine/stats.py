"""Tensor statistics (`apr trace` semantics) and A-vs-B diff statistics (`apr diff --values`).

The numeric contract, shared/reference/aprender-formats.md §2.3 and §3.2. Works on numpy and CuPy
arrays alike (computed where the data lives; results are plain Python numbers). Everything is
vectorised: a 152,064-value logits diff takes a few milliseconds (bench/stats_bench.py).

Top-K and NaN. apr sorts every (index, a, b, d) with `slice::sort_by`, a *stable* sort, with
the comparator `d_y.partial_cmp(d_x).unwrap_or(Equal)`: d descending, NaN "equal" to everything.
The only question Rust's sort ever asks is `is_less(x, y)` = `d_x > d_y` (false when either is
NaN). Without NaN that is a strict weak order and every stable sort gives the same answer:
d descending, ties in ascending index order. We compute exactly that, in O(n).

With NaN the comparator is not transitive (1 ~ NaN ~ 2 but 2 < 1), and the result depends on
the algorithm. For n <= 20 Rust (the old merge sort before 1.81 and driftsort since) runs a
plain insertion sort, which we emulate exactly: an element moves left only past elements with
a strictly smaller d, so a NaN never moves and nothing moves past a NaN. The NaNs keep their
indices and each NaN-free run between them is sorted on its own (`_top_k_with_nan`). For
n > 20 Rust's merge/driftsort outcome is an implementation detail of the Rust release that
built apr (and since Rust 1.81 the sort may even panic when it detects the inconsistent order),
so there we apply the same documented rule rather than port driftsort; it is exact for n <= 20
and for every NaN-free input, which is the case that matters.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from engine.backend import to_host as _to_host
from engine.errors import DiffError


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


# ----------------------------------------------------------------------------- array plumbing

Array = Any
"""A numpy or CuPy ndarray (or anything numpy accepts)."""


def _array_module(*arrays: Array) -> ModuleType:
    """cupy when every input is a CuPy array, numpy otherwise (without importing cupy)."""
    if arrays and all(type(x).__module__.split(".")[0] == "cupy" for x in arrays):
        import cupy

        return cupy
    return np


def _flat_f32(x: Array, xp: ModuleType) -> Array:
    """1-D float32 view (a copy only when the dtype or layout requires one)."""
    flat = xp.asarray(x).reshape(-1)
    return flat if flat.dtype == np.float32 else flat.astype(np.float32)


SUM_CHUNK = 1 << 16
"""Values per chunk of the sequential float64 sums: 512 KiB of float64, cache-resident."""


def _accumulate(
    fa: Array,
    fb: Array,
    d: Array,
    xp: ModuleType,
    totals: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
) -> tuple[float, float, float, float]:
    """sum d², a·b, ‖a‖², ‖b‖² in float64, left to right as apr's `acc += x` loop does,
    continuing from `totals` (the sums of the values before these, for streamed blocks).

    numpy's `sum` along a contiguous axis is pairwise, which differs from apr in the last bits.
    A cumulative sum is a strictly sequential scan, so each sum is computed a chunk at a time
    as `cumsum([running total, x_i, x_i+1, ...])[-1]`: exactly apr's order of additions
    (bit-identical, checked by the tests against a Python loop), with a chunk-sized buffer
    instead of 32 bytes per value. f32 x f32 products are exact in f64, so only the summation
    order matters. On CuPy the sums are parallel reductions and agree to rounding only.

    The scan is latency-bound (~4 ns a value: each addition waits for the one before), so two
    sums share one scan: a complex128 cumsum adds real and imaginary parts independently, each
    a plain float64 addition in the same order, so `cumsum(d² + i·ab)` scans sum d² and a·b at
    the cost of one (measured: 4.0 ns a value against 3.8 for a float64 cumsum).

    The positions where both a and b are zero are left out first when they are many (causal
    attention: the future half). That is exact: their four products are ±0.0, and adding ±0.0
    to a running sum leaves it unchanged (the sum starts at +0.0 and, rounding to nearest, can
    never become -0.0), so the sums of the rest, in the same order, are the sums of all.
    """
    if xp is not np:
        d64, a64, b64 = (v.astype(np.float64) for v in (d, fa, fb))
        pairs = ((d64, d64), (a64, b64), (a64, a64), (b64, b64))
        return tuple(t + float(xp.sum(x * y)) for t, (x, y) in zip(totals, pairs, strict=True))
    n = int(fa.size)
    if n >= SUM_CHUNK:
        nonzero = (fa != 0) | (fb != 0)  # [n]; NaN != 0, so NaN is always kept
        kept = int(np.count_nonzero(nonzero))
        if kept <= n - n // ZERO_SKIP_FRACTION:
            fa, fb, d = fa[nonzero], fb[nonzero], d[nonzero]
            n = kept
    # Two complex lanes: (sum d², sum a·b) and (sum a², sum b²).
    lanes = [complex(totals[0], totals[1]), complex(totals[2], totals[3])]
    buffer, a64, b64, d64 = _scan_scratch()
    for start in range(0, n, SUM_CHUNK):
        stop = min(start + SUM_CHUNK, n)
        part, m = buffer[: stop - start + 1], stop - start
        # Widened once, not inside each of the four products (8 conversions a value -> 3).
        a, b, diff = a64[:m], b64[:m], d64[:m]
        a[...], b[...], diff[...] = fa[start:stop], fb[start:stop], d[start:stop]
        for lane, ((x1, y1), (x2, y2)) in enumerate((((diff, diff), (a, b)), ((a, a), (b, b)))):
            part[0] = lanes[lane]
            np.multiply(x1, y1, out=part.real[1:])
            np.multiply(x2, y2, out=part.imag[1:])
            np.cumsum(part, out=part)
            lanes[lane] = complex(part[-1])
    return lanes[0].real, lanes[0].imag, lanes[1].real, lanes[1].imag


_SCRATCH = threading.local()


def _thread_buffer(name: str, size: int, dtype: Any) -> np.ndarray:
    """This thread's scratch array `name` ([size] of dtype), allocated on first use: fresh
    arrays of a few MB on every call were page-faulted in again each time (glibc returns freed
    blocks of that size to the system), which cost more than the short scans using them."""
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None:
        buffer = np.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer


def _scan_scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's buffers for `_accumulate`: complex128 [SUM_CHUNK + 1] (the running totals,
    then a chunk's products) and three float64 [SUM_CHUNK] (the chunk widened)."""
    return (
        _thread_buffer("scan", SUM_CHUNK + 1, np.complex128),
        _thread_buffer("scan_a", SUM_CHUNK, np.float64),
        _thread_buffer("scan_b", SUM_CHUNK, np.float64),
        _thread_buffer("scan_d", SUM_CHUNK, np.float64),
    )


def _widened(values: Array, xp: ModuleType) -> Array:
    """`values` as float64 [n]: on the host into this thread's STATS_CHUNK scratch buffer, on
    CuPy a new array."""
    n = int(values.size)
    if xp is not np or n > STATS_CHUNK:
        return values.astype(np.float64)
    wide = _thread_buffer("wide", STATS_CHUNK, np.float64)[:n]
    wide[...] = values
    return wide


ZERO_SKIP_FRACTION = 8
"""Leave out the zero pairs before the scan when at least 1/8 of the values are such pairs:
below that, finding and compressing them costs more than the scan they save."""


# ----------------------------------------------------------------------------- tensor stats


def tensor_stats(x: Array) -> TensorStats:
    """`apr trace` statistics (§3.2) of any-shape numpy or CuPy data, as float32.

    NaN and ±Inf are counted and skipped; min / max / mean / std / l2_norm / max_abs cover the
    finite values; std is the sample standard deviation (0 when fewer than two finite values);
    min and max stay +inf / -inf when nothing is finite; an empty tensor is all zeros.
    Sums are float64. apr itself rounds mean and std to f32 for display; we keep the f64 values.

    A large host array is taken STATS_CHUNK values at a time (the chunks' means and squared
    deviations combined by Chan's update, as for streamed blocks): every pass then runs over
    cache-resident data and no float64 copy of the whole tensor is made. The results equal the
    one-array ones to float64 rounding.
    """
    acc = StatsAccumulator()
    acc.add(x)
    return acc.result()


STATS_CHUNK = 1 << 18
"""Values per chunk of `tensor_stats` on the host: 1 MiB of float32, 2 MiB of float64 work."""


# ----------------------------------------------------------------------------- diff stats


TOPK_PREFILTER_MIN = 1 << 16
"""From this many values on, top-K first narrows the candidates with per-chunk maxima."""

TOPK_CHUNK = 1024


def _top_k_candidates(d: np.ndarray, k: int) -> np.ndarray | None:
    """Ascending indices of every d >= t, where t is the k-th largest of the maxima of
    TOPK_CHUNK-value chunks; None when there are too few chunks.

    Those k maxima are k distinct values of d, so the k-th largest d is >= t: every value that
    can be in the top k (and every value tied with the k-th) is a candidate, and the exact
    selection among them gives the same answer as among all n. One vectorised pass for the
    maxima and one comparison, instead of a partition of all n (50× faster at 2.4 M values).
    """
    n = int(d.size)
    full = n - n % TOPK_CHUNK
    # Many ties at the threshold (a causal attention tensor's zeros, identical stages) can
    # make this every value; the caller then partitions all n instead.
    maxima = d[:full].reshape(-1, TOPK_CHUNK).max(axis=1)  # [n // chunk]
    if full < n:
        maxima = np.append(maxima, d[full:].max())
    if maxima.size <= k:
        return None
    threshold = np.partition(maxima, maxima.size - k)[maxima.size - k]
    return np.flatnonzero(d >= threshold)


def _top_k_no_nan(d: Array, k: int, xp: ModuleType, prefilter: bool = True) -> np.ndarray:
    """Indices of the k largest d (NaN-free), d descending, ties by ascending index.

    That is exactly the first k of a stable sort by d descending. O(n): one partition finds
    the k-th largest value; everything above it is in, and of the values equal to it the
    lowest indices fill the rest. Only the <= k candidates are sorted (on the host).
    """
    n = int(d.size)
    if k >= n:
        host = _to_host(d)
        return np.argsort(-host, kind="stable")
    if prefilter and n >= TOPK_PREFILTER_MIN and xp is np:
        candidates = _top_k_candidates(d, k)
        if candidates is not None and candidates.size <= n // 4:
            return candidates[_top_k_no_nan(d[candidates], k, xp, prefilter=False)]
    threshold = xp.partition(d, n - k)[n - k]  # the k-th largest value
    above = xp.flatnonzero(d > threshold)
    tied = xp.flatnonzero(d == threshold)[: k - int(above.size)]
    candidates = _to_host(xp.concatenate([above, tied]))  # [k]
    candidate_d = _to_host(d[xp.asarray(candidates)]) if xp is not np else d[candidates]
    return candidates[np.lexsort((candidates, -candidate_d))]


def _top_k_with_nan(d: np.ndarray, nan_positions: np.ndarray, k: int) -> np.ndarray:
    """The first k of apr's stable sort when some d are NaN (host arrays).

    With NaN comparing Equal, an insertion sort (what Rust runs for n <= 20) never moves a NaN
    and never moves anything past one: the NaNs stay at their indices and every NaN-free run
    between them is stably sorted on its own. So output position p holds the NaN at p if
    there is one, else the (p - start)-th of its run. See the module docstring.
    """
    out: list[np.ndarray] = []
    position = 0  # output position == input position of the current run start
    while position < k:
        j = int(np.searchsorted(nan_positions, position))
        if j < nan_positions.size and nan_positions[j] == position:
            out.append(np.array([position]))
            position += 1
            continue
        run_end = int(nan_positions[j]) if j < nan_positions.size else d.size
        need = min(run_end, k) - position
        out.append(_top_k_no_nan(d[position:run_end], need, np) + position)
        position = run_end
    return np.concatenate(out)


def diff_stats(a: Array, b: Array, limit: int = 10) -> DiffStats:
    """`apr diff --values` statistics (§2.3) of two equal-size tensors (any shape, flattened).

    d = |a - b| in float32; sum d², a·b, ‖a‖², ‖b‖² accumulate left to right in float64 (bit-exact
    with apr on numpy); the first maximum of d wins and NaN never wins (index 0, value 0.0
    when every d is 0 or NaN); rms = sqrt(sum d² / n) rounded to f32 (NaN if any d is NaN, 0 for
    n = 0); cosine = a·b / (‖a‖·‖b‖), 0.0 unless both squared norms are > 0 (so also 0.0 when a
    norm is NaN); top_diffs = the first max(limit, 1) entries of a stable sort by d descending.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    xp = _array_module(a, b)
    fa, fb = _flat_f32(a, xp), _flat_f32(b, xp)  # [n] float32 each
    n = int(fa.size)
    if n != int(fb.size):
        raise DiffError(f"cannot diff tensors of different sizes: {n} vs {int(fb.size)} elements")
    if n == 0:
        return DiffStats(0, 0.0, 0, 0.0, 0.0, ())
    with np.errstate(all="ignore"):
        d = xp.abs(fa - fb)  # [n] float32
        sum_sq_diff, dot, norm_a_sq, norm_b_sq = _accumulate(fa, fb, d, xp)

        nan_mask = xp.isnan(d)
        nan_count = int(xp.count_nonzero(nan_mask))
        d_no_nan = xp.where(nan_mask, np.float32(0), d) if nan_count else d
        max_index = int(xp.argmax(d_no_nan))  # first maximum; 0 when all are 0
        max_abs_diff = float(d_no_nan[max_index])
        rms_diff = float(np.float32(math.sqrt(sum_sq_diff / n)))

    if norm_a_sq > 0.0 and norm_b_sq > 0.0:
        cosine_sim = dot / (math.sqrt(norm_a_sq) * math.sqrt(norm_b_sq))
    else:
        cosine_sim = 0.0

    k = min(max(limit, 1), n)
    if nan_count:
        d_host = _to_host(d)
        top = _top_k_with_nan(d_host, np.flatnonzero(np.isnan(d_host)), k)
    else:
        top = _top_k_no_nan(d, k, xp)
    top_device = xp.asarray(top)
    top_a, top_b, top_d = (_to_host(v[top_device]) for v in (fa, fb, d))
    top_diffs = tuple(
        TopDiff(int(i), float(x), float(y), float(z))
        for i, x, y, z in zip(top.tolist(), top_a, top_b, top_d, strict=True)
    )
    return DiffStats(
        count=n,
        max_abs_diff=max_abs_diff,
        max_abs_diff_index=max_index,
        rms_diff=rms_diff,
        cosine_sim=cosine_sim,
        top_diffs=top_diffs,
    )


# ----------------------------------------------------------------------------- streaming
#
# A long prompt's attention stages arrive as blocks (engine.attention.AttentionStage.blocks:
# (flat offset, block) in payload order), never as one array. These accumulators give the same
# statistics from the blocks, holding one block at a time:
#
# * diff statistics are exact: the four float64 sums continue left to right across blocks
#   (each block's scan starts from the running totals, so the order of additions is the
#   one-array order), the first maximum wins across blocks (a later block
#   must be strictly larger), and the top-K is merged by (d descending, index ascending), which
#   is the one-array stable order for NaN-free d. With NaN the documented n > 20 rule applies
#   within each block;
# * tensor statistics: counts, min, max, max|x| exact; mean, std and the L2 norm combine the
#   blocks' float64 sums (std by Chan's pairwise update), equal to the one-array values to
#   float64 rounding.


def blocks_of(x: Array, rows_like: Any = None) -> Any:
    """(offset, flat block) pairs of x: its own `.blocks()` when it has them (a lazy capture),
    else slices of the array at the offsets and sizes of `rows_like`'s blocks, else x whole."""
    if hasattr(x, "blocks"):
        for offset, block in x.blocks():
            yield offset, block.reshape(-1)
        return
    flat = _flat_f32(x, _array_module(x))
    if rows_like is not None and hasattr(rows_like, "blocks"):
        for offset, block in rows_like.blocks():
            yield offset, flat[offset : offset + block.size]
        return
    yield 0, flat


class StatsAccumulator:
    """`tensor_stats` of a tensor fed block by block (`add`), result by `result()`."""

    def __init__(self) -> None:
        self.count = self.nan = self.inf = self.zero = self.valid = 0
        self.mean = self.m2 = self.sum_sq = 0.0
        self.min, self.max, self.max_abs = math.inf, -math.inf, 0.0

    def add(self, block: Array) -> None:
        """Fold in a block of any size (on the host, STATS_CHUNK values at a time)."""
        xp = _array_module(block)
        flat = _flat_f32(block, xp)
        step = STATS_CHUNK if xp is np else max(int(flat.size), 1)
        for start in range(0, int(flat.size), step):
            self._add_chunk(flat[start : start + step], xp)

    def _add_chunk(self, flat: Array, xp: ModuleType) -> None:
        if flat.size == 0:
            return
        self.count += int(flat.size)
        self.zero += int(flat.size) - int(xp.count_nonzero(flat))  # -0.0 counts as zero
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(xp.sum(flat, dtype=np.float64))
        if math.isfinite(total):  # a float64 sum of float32 values overflows never: all finite
            finite = flat
        else:
            nan_count = int(xp.count_nonzero(xp.isnan(flat)))
            inf_count = int(xp.count_nonzero(xp.isinf(flat)))
            self.nan += nan_count
            self.inf += inf_count
            finite = flat[xp.isfinite(flat)]
            total = float(xp.sum(finite, dtype=np.float64))
        n = int(finite.size)
        if n == 0:
            return
        mean = total / n
        wide = _widened(finite, xp)  # [n] float64, widened once
        self.sum_sq += float(xp.dot(wide, wide))
        wide -= mean  # centred
        m2 = float(xp.dot(wide, wide))
        self._merge(n, mean, m2)
        low, high = float(finite.min()), float(finite.max())
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        self.max_abs = max(self.max_abs, -low, high)  # max |x| is |min| or |max|, exactly

    def add_zeros(self, count: int) -> None:
        """Fold in `count` zeros that were never fed as values (a causal attention tensor's
        future: engine.causal_stats)."""
        if count:
            self.count += count
            self.zero += count
            self._merge(count, 0.0, 0.0)
            self.min, self.max = min(self.min, 0.0), max(self.max, 0.0)

    def _merge(self, n: int, mean: float, m2: float) -> None:
        """Chan's update: combine the finite values so far with n more of this mean and sum of
        squared deviations."""
        merged = self.valid + n
        delta = mean - self.mean
        self.mean += delta * n / merged
        self.m2 += m2 + delta * delta * self.valid * n / merged
        self.valid = merged

    def result(self) -> TensorStats:
        if self.count == 0:
            return TensorStats(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if self.valid == 0:
            return TensorStats(
                self.count, self.nan, self.inf, self.zero, math.inf, -math.inf, 0.0, 0.0, 0.0, 0.0
            )
        std = math.sqrt(self.m2 / (self.valid - 1)) if self.valid > 1 else 0.0
        return TensorStats(
            count=self.count,
            nan_count=self.nan,
            inf_count=self.inf,
            zero_count=self.zero,
            min=self.min,
            max=self.max,
            mean=self.mean,
            std=std,
            l2_norm=math.sqrt(self.sum_sq),
            max_abs=self.max_abs,
        )


class DiffAccumulator:
    """`diff_stats` of two tensors fed as aligned blocks (`add(offset, a, b)`), in order."""

    def __init__(self, limit: int = 10) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.k = max(limit, 1)
        self.count = 0
        self.totals = np.zeros(4, dtype=np.float64)  # sum d², a·b, ‖a‖², ‖b‖²
        self.max_d, self.max_index = -1.0, 0
        self.nan_seen = False
        self.top = np.empty((0, 4), dtype=np.float64)  # rows (index, a, b, d)

    def add(
        self,
        offset: int,
        a: Array,
        b: Array,
        index_of: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Fold in the aligned blocks a and b whose first value is at flat index `offset`;
        `index_of` maps positions in the blocks to flat indices when the blocks are not one
        contiguous run (the causal entries of attention rows: engine.causal_stats)."""
        if index_of is None:

            def index_of(local: np.ndarray) -> np.ndarray:
                return local + offset

        xp = _array_module(a, b)
        fa, fb = _flat_f32(a, xp), _flat_f32(b, xp)
        if fa.size != fb.size:
            raise DiffError(f"blocks differ in size at offset {offset}: {fa.size} vs {fb.size}")
        n = int(fa.size)
        if n == 0:
            return
        self.count += n
        with np.errstate(all="ignore"):
            d = xp.abs(fa - fb)  # [n] float32
            self.totals = np.array(_accumulate(fa, fb, d, xp, tuple(self.totals.tolist())))
            nan_mask = xp.isnan(d)
            nan_count = int(xp.count_nonzero(nan_mask))
            d_no_nan = xp.where(nan_mask, np.float32(0), d) if nan_count else d
            index = int(xp.argmax(d_no_nan))
            value = float(d_no_nan[index])
            if value > self.max_d:
                self.max_d = value
                self.max_index = int(index_of(np.array([index], dtype=np.int64))[0])
        k = min(self.k, n)
        if nan_count:
            self.nan_seen = True
            d_host = _to_host(d)
            top = _top_k_with_nan(d_host, np.flatnonzero(np.isnan(d_host)), k)
        else:
            top = _top_k_no_nan(d, k, xp)
        top_device = xp.asarray(top)
        rows = np.stack(
            [index_of(np.asarray(top, dtype=np.int64)).astype(np.float64)]
            + [_to_host(v[top_device]).astype(np.float64) for v in (fa, fb, d)],
            axis=1,
        )  # [k, (index, a, b, d)]
        self._merge(rows)

    def add_zero_pairs(self, count: int, first: np.ndarray) -> None:
        """Count `count` pairs of zeros left out of the blocks (an attention row's future),
        whose lowest flat indices are `first` (ascending, at least min(k, count) of them):
        they add nothing to the sums and can only enter the top-K at d = 0."""
        self.count += count
        first = np.asarray(first, dtype=np.float64)[: self.k]
        if first.size:
            zeros = np.zeros((first.size, 4), dtype=np.float64)
            zeros[:, 0] = first
            self._merge(zeros)

    def _merge(self, rows: np.ndarray) -> None:
        """Keep the top K of the candidates so far and `rows` [m, (index, a, b, d)]."""
        merged = np.concatenate([self.top, rows])
        if self.nan_seen:  # NaN keeps its place: earlier candidates stay ahead (block order)
            self.top = merged[: self.k]
        else:
            order = np.lexsort((merged[:, 0], -merged[:, 3]))  # d descending, index ascending
            self.top = merged[order[: self.k]]

    def result(self) -> DiffStats:
        if self.count == 0:
            return DiffStats(0, 0.0, 0, 0.0, 0.0, ())
        sum_sq_diff, dot, norm_a_sq, norm_b_sq = self.totals.tolist()
        with np.errstate(all="ignore"):
            rms_diff = float(np.float32(math.sqrt(sum_sq_diff / self.count)))
        if norm_a_sq > 0.0 and norm_b_sq > 0.0:
            cosine_sim = dot / (math.sqrt(norm_a_sq) * math.sqrt(norm_b_sq))
        else:
            cosine_sim = 0.0
        top_diffs = tuple(
            TopDiff(int(i), float(np.float32(x)), float(np.float32(y)), float(np.float32(z)))
            for i, x, y, z in self.top.tolist()
        )
        return DiffStats(
            count=self.count,
            max_abs_diff=max(self.max_d, 0.0),
            max_abs_diff_index=self.max_index,
            rms_diff=rms_diff,
            cosine_sim=cosine_sim,
            top_diffs=top_diffs,
        )


def streamed_stats(x: Array) -> TensorStats:
    """`tensor_stats` of an array or a lazy capture with `.blocks()`, one block at a time."""
    if not hasattr(x, "blocks"):
        return tensor_stats(x)
    acc = StatsAccumulator()
    for _, block in x.blocks():
        acc.add(block)
    return acc.result()


def streamed_pair_stats(
    a: Array, b: Array, limit: int = 10
) -> tuple[TensorStats, TensorStats, DiffStats | None]:
    """Both sides' `tensor_stats` and their `diff_stats` in one pass over aligned blocks.

    Either side may be an array or a lazy capture (`.blocks()`); the other side is sliced at
    the lazy side's block offsets, so at most one block per side is held. Sizes that differ
    give `diff None`. Two plain arrays take the one-array functions.
    """
    if not hasattr(a, "blocks") and not hasattr(b, "blocks"):
        diff = diff_stats(a, b, limit) if int(a.size) == int(b.size) else None
        return tensor_stats(a), tensor_stats(b), diff
    if int(a.size) != int(b.size):
        return streamed_stats(a), streamed_stats(b), None
    guide = a if hasattr(a, "blocks") else b
    stats_a, stats_b, diff = StatsAccumulator(), StatsAccumulator(), DiffAccumulator(limit)
    pairs = zip(blocks_of(a, guide), blocks_of(b, guide), strict=True)
    for (offset, block_a), (_, block_b) in pairs:
        stats_a.add(block_a)
        stats_b.add(block_b)
        diff.add(offset, block_a, block_b)
    return stats_a.result(), stats_b.result(), diff.result()


@dataclass(frozen=True)
class IndexDiff:
    """Two index payloads (`moe_router_indices`: expert ids stored as f32) compared as ids:
    equal or not, and where. Cosine and value differences mean nothing for ids (expert 3 is
    not "close" to expert 4)."""

    equal: bool
    positions: tuple[int, ...]
    """Positions whose ids differ, ascending (all positions past the shorter side included)."""
    a: tuple[int, ...]
    b: tuple[int, ...]


def _ids(x: Array) -> tuple[int, ...]:
    """f32-encoded ids as ints; a non-integral or non-finite value becomes -1 (no valid id)."""
    values = np.asarray(_to_host(x), dtype=np.float64).ravel()
    valid = np.isfinite(values) & (values == np.round(values)) & (values >= 0)
    return tuple(
        int(v) if ok else -1 for v, ok in zip(values.tolist(), valid.tolist(), strict=True)
    )


def index_diff(a: Array, b: Array) -> IndexDiff:
    """Compare two index payloads id by id (apr: "reinterpret as u32 for equality")."""
    ids_a, ids_b = _ids(a), _ids(b)
    longest = max(len(ids_a), len(ids_b))
    positions = tuple(
        i
        for i in range(longest)
        if i >= len(ids_a) or i >= len(ids_b) or ids_a[i] != ids_b[i] or ids_a[i] < 0
    )
    return IndexDiff(equal=not positions, positions=positions, a=ids_a, b=ids_b)
