"""engine.stats against apr's `diff --values` (§2.3) and `trace` (§3.2) semantics.

The references below are plain Python loops written from the spec, element by element, with
numpy only for f32 scalar arithmetic; they share no code with engine.stats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from engine.errors import DiffError
from engine.stats import diff_stats, tensor_stats

F32 = np.float32


# ----------------------------------------------------------------------------- references


def reference_diff(a: list[float], b: list[float]):
    """apr's compute_aprt_stage_stats, transcribed as a Python loop."""
    n = len(a)
    max_d, max_i = F32(0.0), 0
    sum_sq = dot = na = nb = 0.0
    ds = []
    with np.errstate(all="ignore"):
        for i in range(n):
            x, y = F32(a[i]), F32(b[i])
            d = abs(x - y)  # f32 arithmetic
            sum_sq += float(d) * float(d)
            if d > max_d:
                max_d, max_i = d, i
            dot += float(x) * float(y)
            na += float(x) * float(x)
            nb += float(y) * float(y)
            ds.append(float(d))
        rms = 0.0 if n == 0 else float(F32(math.sqrt(sum_sq / n)))
    cosine = dot / (math.sqrt(na) * math.sqrt(nb)) if na > 0.0 and nb > 0.0 else 0.0
    return float(max_d), max_i, rms, cosine, ds


def insertion_sort_order(ds: list[float]) -> list[int]:
    """Rust's insertion_sort_shift_left with is_less(x, y) = d_x > d_y (False on NaN)."""
    order = list(range(len(ds)))
    for i in range(1, len(order)):
        current = order[i]
        j = i
        while j > 0 and ds[current] > ds[order[j - 1]]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = current
    return order


def same_float(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


# ----------------------------------------------------------------------------- §8 vectors


def test_vector_one_element_differs():
    stats = diff_stats([1.0, 2.0, 3.0, 4.0], [1.0, 2.5, 3.0, 4.0], limit=5)
    assert stats.count == 4
    assert stats.max_abs_diff == 0.5 and stats.max_abs_diff_index == 1
    assert stats.rms_diff == 0.25
    assert stats.top_diffs[0].index == 1
    assert (stats.top_diffs[0].a, stats.top_diffs[0].b, stats.top_diffs[0].abs_diff) == (
        2.0,
        2.5,
        0.5,
    )
    # a·b = 1 + 5 + 9 + 16 = 31, ‖a‖² = 30, ‖b‖² = 1 + 6.25 + 9 + 16 = 32.25 (by hand)
    assert stats.cosine_sim == pytest.approx(31.0 / math.sqrt(30.0 * 32.25), rel=1e-15)


def test_vector_top_k_by_abs_b():
    stats = diff_stats([0.0] * 5, [0.1, 0.5, -0.3, 0.05, 0.2], limit=3)
    assert [t.index for t in stats.top_diffs] == [1, 2, 4]
    assert stats.top_diffs[1].b == float(F32(-0.3))
    assert stats.cosine_sim == 0.0  # ‖a‖ = 0


def test_vector_identical_inputs():
    values = [1.0, 2.0, 3.0, 4.0]
    stats = diff_stats(values, values, limit=3)
    assert stats.max_abs_diff == 0.0 and stats.max_abs_diff_index == 0
    assert stats.rms_diff == 0.0
    assert abs(stats.cosine_sim - 1.0) < 1e-12


# ----------------------------------------------------------------------------- rules


def test_first_maximum_wins():
    stats = diff_stats([0.0, 0.0, 0.0, 0.0], [0.0, 2.0, -1.0, -2.0])
    assert stats.max_abs_diff_index == 1 and stats.max_abs_diff == 2.0


def test_nan_never_wins_the_maximum():
    stats = diff_stats([np.nan, 1.0, 0.0], [0.0, 0.0, 0.5])
    assert stats.max_abs_diff_index == 1 and stats.max_abs_diff == 1.0
    assert math.isnan(stats.rms_diff)


def test_all_zero_or_nan_keeps_index_zero():
    stats = diff_stats([1.0, np.nan, 2.0], [1.0, 0.0, 2.0])
    assert stats.max_abs_diff_index == 0 and stats.max_abs_diff == 0.0


def test_nan_norm_gives_cosine_zero():
    # ‖a‖² is NaN, and `NaN > 0` is false in apr's check
    assert diff_stats([np.nan, 1.0], [1.0, 1.0]).cosine_sim == 0.0


def test_zero_norm_gives_cosine_zero():
    assert diff_stats([0.0, 0.0], [1.0, 2.0]).cosine_sim == 0.0
    assert diff_stats([1.0, 2.0], [0.0, -0.0]).cosine_sim == 0.0


def test_difference_is_taken_in_f32():
    # 2**24 - 0.5 = 16777215.5 is a tie in f32 and rounds to even, 16777216; f64 would keep .5
    stats = diff_stats([16777216.0], [0.5])
    assert stats.max_abs_diff == 16777216.0


def test_f32_overflow_gives_inf():
    stats = diff_stats([3e38], [-3e38])
    assert stats.max_abs_diff == math.inf and stats.rms_diff == math.inf
    assert stats.cosine_sim == -1.0


def test_inf_minus_inf_is_nan_and_does_not_win():
    stats = diff_stats([np.inf, 1.0], [np.inf, 3.0])
    assert stats.max_abs_diff_index == 1 and stats.max_abs_diff == 2.0


def test_empty_tensors():
    stats = diff_stats(np.zeros(0, F32), np.zeros(0, F32))
    assert (stats.count, stats.max_abs_diff, stats.max_abs_diff_index) == (0, 0.0, 0)
    assert (stats.rms_diff, stats.cosine_sim, stats.top_diffs) == (0.0, 0.0, ())


def test_limit_zero_behaves_as_one_and_k_is_truncated_to_n():
    assert len(diff_stats([1.0, 2.0], [0.0, 0.0], limit=0).top_diffs) == 1
    assert len(diff_stats([1.0, 2.0], [0.0, 0.0], limit=50).top_diffs) == 2


def test_negative_limit_is_rejected():
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        diff_stats([1.0], [1.0], limit=-1)


def test_ties_keep_ascending_index_even_when_k_splits_the_tie():
    d = [1.0, 3.0, 3.0, 3.0, 2.0, 3.0]
    stats = diff_stats([0.0] * 6, d, limit=2)
    assert [t.index for t in stats.top_diffs] == [1, 2]
    stats = diff_stats([0.0] * 6, d, limit=5)
    assert [t.index for t in stats.top_diffs] == [1, 2, 3, 5, 4]


def test_large_tie_block_selects_lowest_indices():
    b = np.zeros(10_000, F32)
    b[[9000, 10, 5000]] = 7.0
    stats = diff_stats(np.zeros_like(b), b, limit=5)
    assert [t.index for t in stats.top_diffs] == [10, 5000, 9000, 0, 1]


def test_any_shape_is_flattened():
    a = np.arange(6, dtype=F32).reshape(2, 3)
    b = a.copy()
    b[1, 2] += 4
    stats = diff_stats(a, b)
    assert stats.count == 6 and stats.max_abs_diff_index == 5


def test_different_sizes_are_a_diff_error():
    with pytest.raises(DiffError) as caught:
        diff_stats([1.0, 2.0], [1.0, 2.0, 3.0])
    assert str(caught.value) == "cannot diff tensors of different sizes: 2 vs 3 elements"


def test_float64_input_is_rounded_to_f32_first():
    stats = diff_stats(np.array([0.1], np.float64), np.array([float(F32(0.1))], np.float64))
    assert stats.max_abs_diff == 0.0


def test_nan_keeps_its_place_in_the_top_list_like_insertion_sort():
    # d = [1, NaN, 5, 3]: insertion sort never moves 5 past the NaN
    stats = diff_stats([0.0, np.nan, 0.0, 0.0], [1.0, 0.0, 5.0, 3.0], limit=4)
    assert [t.index for t in stats.top_diffs] == [0, 1, 2, 3]
    assert math.isnan(stats.top_diffs[1].abs_diff) and math.isnan(stats.top_diffs[1].a)


# ----------------------------------------------------------------------------- properties

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_f32_bits = st.integers(0, 0xFFFFFFFF)


@st.composite
def finite_pairs(draw):
    n = draw(st.integers(1, 60))
    a = draw(arrays(F32, n, elements=finite_f32))
    b = draw(arrays(F32, n, elements=finite_f32))
    # mix in exact duplicates so ties and zero diffs are common
    if draw(st.booleans()):
        mask = draw(arrays(np.bool_, n))
        b = np.where(mask, a, b)
    return a, b


@settings(max_examples=200, deadline=None)
@given(finite_pairs(), st.integers(0, 70))
def test_diff_matches_the_float64_loop_reference(pair, limit):
    a, b = pair
    assume(np.all(np.isfinite(a.astype(np.float64) - b.astype(np.float64))))
    max_d, max_i, rms, cosine, ds = reference_diff(a.tolist(), b.tolist())
    stats = diff_stats(a, b, limit)
    assert stats.count == len(a)
    assert stats.max_abs_diff == max_d and stats.max_abs_diff_index == max_i
    assert same_float(stats.rms_diff, rms)  # bit-exact: same left-to-right f64 sum
    assert same_float(stats.cosine_sim, cosine)
    k = min(max(limit, 1), len(a))
    expected = sorted(range(len(a)), key=lambda i: (-ds[i], i))[:k]
    assert [t.index for t in stats.top_diffs] == expected
    for top in stats.top_diffs:
        assert (top.a, top.b, top.abs_diff) == (
            float(a[top.index]),
            float(b[top.index]),
            ds[top.index],
        )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(any_f32_bits, min_size=1, max_size=20),
    st.lists(any_f32_bits, min_size=20, max_size=20),
)
def test_small_inputs_with_nan_and_inf_match_rusts_insertion_sort(a_bits, b_bits):
    n = len(a_bits)
    a = np.array(a_bits, np.uint32).view(F32)
    b = np.array(b_bits[:n], np.uint32).view(F32)
    max_d, max_i, rms, cosine, ds = reference_diff(a.tolist(), b.tolist())
    stats = diff_stats(a, b, limit=n)
    assert same_float(stats.max_abs_diff, max_d) and stats.max_abs_diff_index == max_i
    assert same_float(stats.rms_diff, rms)
    assert same_float(stats.cosine_sim, cosine)
    assert [t.index for t in stats.top_diffs] == insertion_sort_order(ds)
    # and every prefix length gives the prefix of that order
    for k in (1, max(1, n // 2)):
        assert [t.index for t in diff_stats(a, b, limit=k).top_diffs] == insertion_sort_order(ds)[
            :k
        ]


def test_big_input_with_nans_follows_the_documented_run_rule():
    rng = np.random.default_rng(7)
    a = rng.standard_normal(5000).astype(F32)
    b = rng.standard_normal(5000).astype(F32)
    a[[3, 4000]] = np.nan
    ds = np.abs(a - b).tolist()
    stats = diff_stats(a, b, limit=10)
    # NaN at 3 stays at output position 3; run [0, 3) sorted; then the run [4, 4000)
    expected = sorted(range(3), key=lambda i: -ds[i]) + [3]
    expected += sorted(range(4, 4000), key=lambda i: (-ds[i], i))[:6]
    assert [t.index for t in stats.top_diffs] == expected


# ----------------------------------------------------------------------------- tensor stats


def reference_tensor_stats(values: list[float]):
    finite = [v for v in values if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
    return {
        "count": len(values),
        "nan_count": sum(math.isnan(v) for v in values),
        "inf_count": sum(math.isinf(v) for v in values),
        "zero_count": sum(v == 0.0 for v in values),
        "min": min(finite) if finite else math.inf,
        "max": max(finite) if finite else -math.inf,
        "mean": mean,
        "std": math.sqrt(var),
        "l2_norm": math.sqrt(sum(v * v for v in finite)),
        "max_abs": max((abs(v) for v in finite), default=0.0),
    }


def test_tensor_stats_known_values():
    stats = tensor_stats(np.array([[1.0, 2.0], [3.0, 4.0]], F32))
    assert (stats.count, stats.min, stats.max, stats.mean) == (4, 1.0, 4.0, 2.5)
    assert stats.std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-15)  # sample std
    assert stats.l2_norm == pytest.approx(math.sqrt(30.0), rel=1e-15)
    assert stats.max_abs == 4.0


def test_tensor_stats_counts_and_skips_non_finite():
    stats = tensor_stats([np.nan, np.inf, -np.inf, 0.0, -0.0, -5.0, 1.0])
    assert (stats.count, stats.nan_count, stats.inf_count, stats.zero_count) == (7, 1, 2, 2)
    assert (stats.min, stats.max, stats.max_abs) == (-5.0, 1.0, 5.0)
    assert stats.mean == -1.0


def test_tensor_stats_nothing_finite():
    stats = tensor_stats([np.nan, np.inf])
    assert (stats.min, stats.max, stats.mean, stats.std) == (math.inf, -math.inf, 0.0, 0.0)
    assert (stats.l2_norm, stats.max_abs) == (0.0, 0.0)


def test_tensor_stats_single_value_has_zero_std():
    assert tensor_stats([3.0]).std == 0.0


def test_tensor_stats_empty_is_all_zeros():
    stats = tensor_stats(np.zeros((0, 4), F32))
    assert stats == type(stats)(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@settings(max_examples=150, deadline=None)
@given(st.lists(any_f32_bits, min_size=1, max_size=80))
def test_tensor_stats_match_the_loop_reference(bits):
    values = np.array(bits, np.uint32).view(F32)
    expected = reference_tensor_stats([float(v) for v in values])
    stats = tensor_stats(values)
    for key in ("count", "nan_count", "inf_count", "zero_count", "min", "max", "max_abs"):
        assert getattr(stats, key) == expected[key], key
    for key in ("mean", "std", "l2_norm"):
        got, want = getattr(stats, key), expected[key]
        if math.isinf(want):  # f32 max squared overflows neither side in f64; keep it honest
            assert got == want
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-300), key


def test_f64_sums_are_sequential_like_apr_on_a_large_input():
    # numpy's pairwise sum would differ from apr's left-to-right loop in the last bits here
    rng = np.random.default_rng(11)
    a = rng.standard_normal(100_003).astype(F32)
    b = (a + rng.standard_normal(100_003).astype(F32) * F32(0.01)).astype(F32)
    _, _, rms, cosine, ds = reference_diff(a.tolist(), b.tolist())
    pairwise = float(np.sum(np.square(np.array(ds, np.float64))))
    assert pairwise != sum(d * d for d in ds)  # the test would notice a pairwise sum
    stats = diff_stats(a, b)
    assert stats.rms_diff == rms
    assert stats.cosine_sim == cosine


def _cuda_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _cuda_available(), reason="needs CuPy and a CUDA device")
def test_cupy_inputs_give_the_numpy_answer():
    import cupy

    rng = np.random.default_rng(2)
    a = rng.standard_normal((7, 300)).astype(F32)
    b = (a + rng.standard_normal((7, 300)).astype(F32) * F32(0.1)).astype(F32)
    b[0, 5] = np.nan
    for limit in (1, 10):
        on_host = diff_stats(a, b, limit)
        on_device = diff_stats(cupy.asarray(a), cupy.asarray(b), limit)
        assert on_device.top_diffs == on_host.top_diffs
        assert on_device.max_abs_diff_index == on_host.max_abs_diff_index
        assert on_device.cosine_sim == pytest.approx(on_host.cosine_sim, rel=1e-12)
    b[0, 5] = 0.0
    assert (
        diff_stats(cupy.asarray(a), cupy.asarray(b), 5).top_diffs == diff_stats(a, b, 5).top_diffs
    )
    host_stats, device_stats = tensor_stats(a), tensor_stats(cupy.asarray(a))
    assert (device_stats.count, device_stats.min, device_stats.max) == (
        host_stats.count,
        host_stats.min,
        host_stats.max,
    )
    assert device_stats.std == pytest.approx(host_stats.std, rel=1e-12)


def test_sums_skip_zero_pairs_exactly_on_a_causal_attention_tensor():
    # Half of a causal [heads, seq, seq] tensor is 0.0 on both sides; the scan leaves those
    # pairs out (engine.stats.ZERO_SKIP_FRACTION). The sums must still be apr's loop, bit for
    # bit, including a -0.0 on one side and +0.0 on the other.
    rng = np.random.default_rng(12)
    heads, seq = 2, 300  # 180,000 values: above SUM_CHUNK, so the skip is taken
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    a = rng.standard_normal((heads, seq, seq)).astype(F32)
    b = (a + rng.standard_normal(a.shape).astype(F32) * F32(0.001)).astype(F32)
    a[:, future] = F32(0.0)
    b[:, future] = F32(-0.0)
    a[0, 5, 3] = b[0, 5, 3] = F32(0.0)  # a zero pair inside the kept half as well
    _, _, rms, cosine, _ = reference_diff(a.ravel().tolist(), b.ravel().tolist())
    stats = diff_stats(a, b)
    assert stats.rms_diff == rms
    assert stats.cosine_sim == cosine


def test_tensor_stats_of_a_large_array_in_chunks_match_the_loop_reference():
    # Larger than STATS_CHUNK (1 << 18), with NaN, ±Inf and zeros spread over several chunks.
    rng = np.random.default_rng(13)
    values = (rng.standard_normal(700_001) * 3 + 1.5).astype(F32)
    values[[10, 300_000, 650_000]] = np.nan
    values[[20, 400_000]] = np.inf
    values[500_000] = -np.inf
    values[rng.integers(0, values.size, 1000)] = F32(0.0)
    expected = reference_tensor_stats([float(v) for v in values])
    stats = tensor_stats(values)
    for key in ("count", "nan_count", "inf_count", "zero_count", "min", "max", "max_abs"):
        assert getattr(stats, key) == expected[key], key
    for key in ("mean", "std", "l2_norm"):
        assert getattr(stats, key) == pytest.approx(expected[key], rel=1e-12), key


def loop_sums(a, b, d, totals):
    """apr's four float64 sums as a Python loop, continuing from `totals`."""
    want = list(totals)
    for x, y, z in zip(a.tolist(), b.tolist(), d.tolist(), strict=True):
        want[0] += z * z
        want[1] += x * y
        want[2] += x * x
        want[3] += y * y
    return want


def test_the_four_sums_are_each_apr_s_loop_even_with_nan_and_inf_in_one_of_them():
    """The scan pairs two sums in one complex128 cumsum (real and imaginary lanes): each lane is
    its own left-to-right float64 loop, and a NaN or Inf in one never reaches the other."""
    from engine.stats import SUM_CHUNK, _accumulate

    rng = np.random.default_rng(5)
    n = SUM_CHUNK + 4_321  # two chunks: the running totals carry across the chunk edge
    a = rng.standard_normal(n).astype(F32)
    b = (a + rng.standard_normal(n).astype(F32) * F32(0.01)).astype(F32)
    b[7] = np.inf  # sum b² and sum a·b become inf; sum a² must stay finite and exact
    d = np.abs(a - b)
    totals = (0.25, -1.5, 3.0, 0.0)  # a streamed block continues from earlier totals
    want = loop_sums(a, b, d, totals)
    got = _accumulate(a, b, d, np, totals)
    assert list(got) == want
    assert math.isfinite(got[2]) and got[3] == math.inf and math.isinf(got[1])
    a[7], b[7] = F32(1.0), F32(2.0)
    d = np.abs(a - b)
    want = loop_sums(a, b, d, totals)
    assert list(_accumulate(a, b, d, np, totals)) == want
