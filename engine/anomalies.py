"""apr's anomaly flags over `TensorStats`: what `apr trace` would warn about, cell by cell.

Pure rules, shared by `bisect` (its report lists them) and the explorer (aprtui.anomalies adds
the markers and highlights).

The rules are apr's (shared/reference/aprender-formats.md §3.4):

- `trace.rs::detect_anomalies`, for every traced tensor: NaN count > 0; Inf count > 0;
  std < 1e-8 with more than one element ("near-zero variance"); max|x| > 100 ("large values");
  |mean| > 10 ("large mean bias").
- the per-layer status `[HIGH-VAR]`: the layer's output (`post_ffn_residual`) has std > 100.

All comparisons are strict, as in apr: exactly 100, 10 or 1e-8 is not flagged. These are pure
functions of the statistics the engine already computed, so flagging costs nothing per cell
and works the same for a model side and a trace-directory side, with or without a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.compare import Cell
from engine.stats import TensorStats

NEAR_ZERO_STD = 1e-8
LARGE_VALUE = 100.0
LARGE_MEAN = 10.0
HIGH_VAR_STD = 100.0
HIGH_VAR_STAGE = "post_ffn_residual"
"""apr's layer status looks at the layer output, which is the residual after the FFN."""

Rule = Literal["nan", "inf", "near_zero_variance", "large_values", "large_mean_bias", "high_var"]
RULE_NAMES: dict[str, str] = {
    "nan": "NaN",
    "inf": "Inf",
    "near_zero_variance": "near-zero variance",
    "large_values": "large values",
    "large_mean_bias": "large mean bias",
    "high_var": "HIGH-VAR",
}
"""Short names, in the order the rules are checked."""


@dataclass(frozen=True)
class Anomaly:
    """One rule a tensor breaks, with the numbers that break it."""

    rule: Rule
    detail: str
    """The evidence, e.g. `max|x| 312.4 > 100`."""

    @property
    def name(self) -> str:
        return RULE_NAMES[self.rule]

    @property
    def words(self) -> str:
        """`large values (max|x| 312.4 > 100)`."""
        return f"{self.name} ({self.detail})"

    @property
    def severe(self) -> bool:
        """NaN and Inf are numerical failure; the others are warnings."""
        return self.rule in ("nan", "inf")


def tensor_anomalies(stats: TensorStats) -> tuple[Anomaly, ...]:
    """apr's `detect_anomalies` rules on one tensor's statistics, in apr's order."""
    found: list[Anomaly] = []
    if stats.nan_count > 0:
        found.append(Anomaly("nan", f"{stats.nan_count} of {stats.count} values"))
    if stats.inf_count > 0:
        found.append(Anomaly("inf", f"{stats.inf_count} of {stats.count} values"))
    if stats.count > 1 and stats.std < NEAR_ZERO_STD:
        found.append(Anomaly("near_zero_variance", f"std {stats.std:.3g} < {NEAR_ZERO_STD:g}"))
    if stats.max_abs > LARGE_VALUE:
        found.append(Anomaly("large_values", f"max|x| {stats.max_abs:.6g} > {LARGE_VALUE:g}"))
    if abs(stats.mean) > LARGE_MEAN:
        found.append(Anomaly("large_mean_bias", f"|mean| {abs(stats.mean):.6g} > {LARGE_MEAN:g}"))
    return tuple(found)


def layer_status_anomalies(stage: str, stats: TensorStats) -> tuple[Anomaly, ...]:
    """apr's `[HIGH-VAR]` layer status: the layer output's std above 100."""
    if stage == HIGH_VAR_STAGE and stats.std > HIGH_VAR_STD:
        return (Anomaly("high_var", f"layer output std {stats.std:.6g} > {HIGH_VAR_STD:g}"),)
    return ()


def stats_anomalies(stage: str, stats: TensorStats | None) -> tuple[Anomaly, ...]:
    """Every flag of one side of one (layer, stage); none for a side that lacks the stage."""
    if stats is None:
        return ()
    return tensor_anomalies(stats) + layer_status_anomalies(stage, stats)


@dataclass(frozen=True)
class CellAnomalies:
    """The flags of both sides of one cell."""

    a: tuple[Anomaly, ...] = ()
    b: tuple[Anomaly, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.a or self.b)

    @property
    def high_var(self) -> bool:
        return any(flag.rule == "high_var" for flag in (*self.a, *self.b))

    def sides(self) -> list[tuple[str, tuple[Anomaly, ...]]]:
        """(`A` / `B`, flags) for each side that has any."""
        return [(side, flags) for side, flags in (("A", self.a), ("B", self.b)) if flags]

    def summary(self) -> str:
        """One short line: `A: large values, large mean bias · B: large values`."""
        return " · ".join(
            f"{side}: " + ", ".join(flag.name for flag in flags) for side, flags in self.sides()
        )


def cell_anomalies(cell: Cell) -> CellAnomalies:
    """Side A's flags and, when there is one, side B's."""
    return CellAnomalies(
        a=stats_anomalies(cell.stage, cell.stats_a), b=stats_anomalies(cell.stage, cell.stats_b)
    )


def grid_anomalies(cell: Cell) -> CellAnomalies:
    """The flags the grid marks for one cell.

    Alone (no reference), every flag of side A. With a reference, only the rules one side breaks
    and the other does not: a healthy model trips apr's crude rules by itself (SmolLM2-135M's
    layer outputs have std near 400 from layer 11 on, so half its layers are HIGH-VAR), and a
    flag both sides share says nothing about where they disagree. The stats panel and the
    drill-down still list every flag of both sides.
    """
    flags = cell_anomalies(cell)
    if cell.stats_a is None or cell.stats_b is None:
        return flags
    rules_a = {flag.rule for flag in flags.a}
    rules_b = {flag.rule for flag in flags.b}
    return CellAnomalies(
        a=tuple(flag for flag in flags.a if flag.rule not in rules_b),
        b=tuple(flag for flag in flags.b if flag.rule not in rules_a),
    )
