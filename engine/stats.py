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
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

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


def _to_host(x: Array) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def _flat_f32(x: Array, xp: ModuleType) -> Array:
    """1-D float32 view (a copy only when the dtype or layout requires one)."""
    flat = xp.asarray(x).reshape(-1)
    return flat if flat.dtype == np.float32 else flat.astype(np.float32)


def _accumulate(
    fa: Array, fb: Array, d: Array, xp: ModuleType
) -> tuple[float, float, float, float]:
    """sum d², a·b, ‖a‖², ‖b‖² in float64, left to right as apr's `acc += x` loop does.

    numpy's `sum` along a contiguous axis is pairwise, which differs from apr in the last bits.
    Reducing axis 0 of an [n, 4] array instead walks the rows in order and adds each row into
    the 4 running totals: a strictly sequential sum per column (bit-identical to apr, checked
    by the tests against a Python loop), and one pass over memory for all four. f32 x f32
    products are exact in f64, so only the summation order matters. On CuPy the reduction is
    parallel and agrees to rounding only.
    """
    if xp is not np:
        d64, a64, b64 = (v.astype(np.float64) for v in (d, fa, fb))
        return tuple(
            float(xp.sum(x * y)) for x, y in ((d64, d64), (a64, b64), (a64, a64), (b64, b64))
        )
    products = np.empty((fa.size, 4), dtype=np.float64)  # [n, (d², a·b, a², b²)]
    np.multiply(d, d, out=products[:, 0], dtype=np.float64)
    np.multiply(fa, fb, out=products[:, 1], dtype=np.float64)
    np.multiply(fa, fa, out=products[:, 2], dtype=np.float64)
    np.multiply(fb, fb, out=products[:, 3], dtype=np.float64)
    sum_sq_diff, dot, norm_a_sq, norm_b_sq = np.add.reduce(products, axis=0).tolist()
    return sum_sq_diff, dot, norm_a_sq, norm_b_sq


# ----------------------------------------------------------------------------- tensor stats


def tensor_stats(x: Array) -> TensorStats:
    """`apr trace` statistics (§3.2) of any-shape numpy or CuPy data, as float32.

    NaN and ±Inf are counted and skipped; min / max / mean / std / l2_norm / max_abs cover the
    finite values; std is the sample standard deviation (0 when fewer than two finite values);
    min and max stay +inf / -inf when nothing is finite; an empty tensor is all zeros.
    Sums are float64. apr itself rounds mean and std to f32 for display; we keep the f64 values.
    """
    xp = _array_module(x)
    flat = _flat_f32(x, xp)
    count = int(flat.size)
    if count == 0:
        return TensorStats(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    nan_count = int(xp.count_nonzero(xp.isnan(flat)))
    inf_count = int(xp.count_nonzero(xp.isinf(flat)))
    zero_count = int(xp.count_nonzero(flat == 0))
    finite = flat if nan_count + inf_count == 0 else flat[xp.isfinite(flat)]
    valid = int(finite.size)
    if valid == 0:
        return TensorStats(
            count, nan_count, inf_count, zero_count, math.inf, -math.inf, 0.0, 0.0, 0.0, 0.0
        )
    finite64 = finite.astype(np.float64)  # [valid]
    mean = float(finite64.sum()) / valid
    centred = finite64 - mean
    # elementwise square + pairwise sum, not BLAS dot: dot wakes BLAS threads (ms on busy hosts)
    std = math.sqrt(float((centred * centred).sum()) / (valid - 1)) if valid > 1 else 0.0
    return TensorStats(
        count=count,
        nan_count=nan_count,
        inf_count=inf_count,
        zero_count=zero_count,
        min=float(finite.min()),
        max=float(finite.max()),
        mean=mean,
        std=std,
        l2_norm=math.sqrt(float((finite64 * finite64).sum())),
        max_abs=float(xp.abs(finite).max()),
    )


# ----------------------------------------------------------------------------- diff stats


def _top_k_no_nan(d: Array, k: int, xp: ModuleType) -> np.ndarray:
    """Indices of the k largest d (NaN-free), d descending, ties by ascending index.

    That is exactly the first k of a stable sort by d descending. O(n): one partition finds
    the k-th largest value; everything above it is in, and of the values equal to it the
    lowest indices fill the rest. Only the <= k candidates are sorted (on the host).
    """
    n = int(d.size)
    if k >= n:
        host = _to_host(d)
        return np.argsort(-host, kind="stable")
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
