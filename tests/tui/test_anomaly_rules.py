"""apr's anomaly rules (aprender-formats.md §3.4) on hand-made TensorStats, at their boundaries."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aprtui.anomalies import (
    CellAnomalies,
    cell_anomalies,
    flagged_fields,
    grid_anomalies,
    stats_anomalies,
    tensor_anomalies,
)
from engine.compare import Cell
from engine.stats import TensorStats

HEALTHY = TensorStats(
    count=10,
    nan_count=0,
    inf_count=0,
    zero_count=0,
    min=-1.0,
    max=1.0,
    mean=0.0,
    std=0.5,
    l2_norm=2.0,
    max_abs=1.0,
)


def above(value: float) -> float:
    """The next float64 above `value`: just past a strict threshold."""
    return float(np.nextafter(value, np.inf))


def below(value: float) -> float:
    return float(np.nextafter(value, -np.inf))


def rules(stats: TensorStats, stage: str = "attn_out") -> list[str]:
    return [flag.rule for flag in stats_anomalies(stage, stats)]


def test_healthy_tensor_has_no_flags():
    assert rules(HEALTHY) == []
    assert rules(HEALTHY, "post_ffn_residual") == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"nan_count": 0}, []),
        ({"nan_count": 1}, ["nan"]),
        ({"inf_count": 0}, []),
        ({"inf_count": 1}, ["inf"]),
        ({"nan_count": 2, "inf_count": 3}, ["nan", "inf"]),
    ],
)
def test_nan_and_inf_counts(changes, expected):
    assert rules(replace(HEALTHY, **changes)) == expected


@pytest.mark.parametrize(
    ("count", "std", "expected"),
    [
        (2, 1e-8, []),  # strict: exactly 1e-8 is not near-zero
        (2, below(1e-8), ["near_zero_variance"]),
        (2, 0.0, ["near_zero_variance"]),
        (1, 0.0, []),  # a single element has no variance to speak of
        (0, 0.0, []),
    ],
)
def test_near_zero_variance_needs_more_than_one_element(count, std, expected):
    stats = replace(HEALTHY, count=count, std=std, min=0.0, max=0.0, max_abs=0.0)
    assert rules(stats) == expected


@pytest.mark.parametrize(
    ("max_abs", "expected"),
    [(100.0, []), (above(100.0), ["large_values"]), (1e6, ["large_values"])],
)
def test_large_values(max_abs, expected):
    assert rules(replace(HEALTHY, max_abs=max_abs, max=max_abs)) == expected


@pytest.mark.parametrize(
    ("mean", "expected"),
    [
        (10.0, []),
        (-10.0, []),
        (above(10.0), ["large_mean_bias"]),
        (below(-10.0), ["large_mean_bias"]),
    ],
)
def test_large_mean_bias_either_sign(mean, expected):
    assert rules(replace(HEALTHY, mean=mean)) == expected


@pytest.mark.parametrize(
    ("stage", "std", "expected"),
    [
        ("post_ffn_residual", 100.0, []),
        ("post_ffn_residual", above(100.0), ["high_var"]),
        ("ffn_out", 500.0, []),  # the layer status looks at the layer output only
        ("attn_out", 1e4, []),
    ],
)
def test_high_var_is_the_layer_output_std(stage, std, expected):
    assert rules(replace(HEALTHY, std=std), stage) == expected


def test_rules_come_in_apr_order_with_their_evidence():
    stats = replace(
        HEALTHY, nan_count=1, inf_count=2, max_abs=312.5, max=312.5, mean=-12.25, std=150.0
    )
    flags = stats_anomalies("post_ffn_residual", stats)
    assert [f.rule for f in flags] == [
        "nan",
        "inf",
        "large_values",
        "large_mean_bias",
        "high_var",
    ]
    assert [f.words for f in flags] == [
        "NaN (1 of 10 values)",
        "Inf (2 of 10 values)",
        "large values (max|x| 312.5 > 100)",
        "large mean bias (|mean| 12.25 > 10)",
        "HIGH-VAR (layer output std 150 > 100)",
    ]
    assert [f.severe for f in flags] == [True, True, False, False, False]
    # just past the threshold, the evidence keeps enough digits to show it is past
    barely = tensor_anomalies(replace(HEALTHY, max_abs=100.032, max=100.032))
    assert [f.words for f in barely] == ["large values (max|x| 100.032 > 100)"]
    near_zero = tensor_anomalies(replace(HEALTHY, std=2e-9))
    assert [f.words for f in near_zero] == ["near-zero variance (std 2e-09 < 1e-08)"]


def test_cell_flags_both_sides_and_a_missing_side_has_none():
    large = replace(HEALTHY, max_abs=250.0, min=-250.0)
    cell = Cell(3, "ffn_up", (7, 128), HEALTHY, large, None)
    flags = cell_anomalies(cell)
    assert flags.a == ()
    assert [f.rule for f in flags.b] == ["large_values"]
    assert bool(flags)
    assert flags.summary() == "B: large values"
    assert not flags.high_var
    single = cell_anomalies(Cell(3, "ffn_up", (7, 128), large, None, None))
    assert single.b == () and single.summary() == "A: large values"
    assert not cell_anomalies(Cell(3, "qkv_bias", (), None, None, None))
    assert not CellAnomalies()


def test_flagged_fields_point_at_the_evidence():
    stats = replace(HEALTHY, min=-250.0, max=3.0, max_abs=250.0, mean=11.0, nan_count=1)
    flags = stats_anomalies("attn_out", stats)
    # large values: only the side of the range beyond 100 (min here), not max
    assert flagged_fields(stats, flags) == {"nan_count", "min", "mean"}
    high = replace(HEALTHY, std=101.0)
    assert flagged_fields(high, stats_anomalies("post_ffn_residual", high)) == {"std"}


LOUD = replace(HEALTHY, max=150.0, max_abs=150.0, std=120.0)
"""Large values, and HIGH-VAR when it is a layer output."""


def _cell(stats_a: TensorStats | None, stats_b: TensorStats | None) -> Cell:
    return Cell(
        layer=3, stage="post_ffn_residual", shape=(10,), stats_a=stats_a, stats_b=stats_b, diff=None
    )


def test_grid_marks_every_flag_without_a_reference():
    flags = grid_anomalies(_cell(LOUD, None))
    assert [flag.rule for flag in flags.a] == ["large_values", "high_var"]
    assert flags.b == ()


def test_grid_hides_flags_both_sides_share():
    """A healthy model that trips apr's rules by itself must not light up the compare grid."""
    assert not grid_anomalies(_cell(LOUD, LOUD))
    # ... while the drill-down still has both sides' flags.
    assert len(cell_anomalies(_cell(LOUD, LOUD)).sides()) == 2


def test_grid_marks_what_only_one_side_breaks():
    nan_b = replace(LOUD, nan_count=2)
    flags = grid_anomalies(_cell(LOUD, nan_b))
    assert flags.a == ()
    assert [flag.rule for flag in flags.b] == ["nan"]
    flags = grid_anomalies(_cell(HEALTHY, LOUD))
    assert [flag.rule for flag in flags.b] == ["large_values", "high_var"]
    assert flags.high_var  # the layer label still turns gold for B's HIGH-VAR
