"""How the explorer shows apr's anomaly flags: markers, colours and highlighted fields.

The rules themselves are `engine.anomalies` (pure, also used by `bisect`); this module re-exports
them for the widgets and adds what only a screen needs.
"""

from __future__ import annotations

from engine.anomalies import (  # noqa: F401  (re-exported for the widgets)
    HIGH_VAR_STAGE,
    HIGH_VAR_STD,
    LARGE_MEAN,
    LARGE_VALUE,
    NEAR_ZERO_STD,
    RULE_NAMES,
    Anomaly,
    CellAnomalies,
    Rule,
    cell_anomalies,
    grid_anomalies,
    layer_status_anomalies,
    stats_anomalies,
    tensor_anomalies,
)
from engine.stats import TensorStats

ANOMALY_MARKER = "!"
"""Drawn in the gap before a flagged grid cell, and in the legend."""
FLAG_COLOUR = "#ffd700"
"""Gold: the anomaly marker's background and the HIGH-VAR layer label (app.tcss uses it too)."""
MARKER_STYLE = f"bold black on {FLAG_COLOUR}"
WARNING_STYLE = f"bold {FLAG_COLOUR}"
SEVERE_STYLE = "bold red"


FLAGGED_FIELDS: dict[str, tuple[str, ...]] = {
    "nan": ("nan_count",),
    "inf": ("inf_count",),
    "near_zero_variance": ("std",),
    "large_values": ("min", "max"),
    "large_mean_bias": ("mean",),
    "high_var": ("std",),
}
"""The statistics rows that show each rule's evidence (highlighted in the stats tables)."""


def flagged_fields(stats: TensorStats | None, flags: tuple[Anomaly, ...]) -> set[str]:
    """The TensorStats fields to highlight; for large values only the side (min / max) over 100."""
    fields: set[str] = set()
    for flag in flags:
        for name in FLAGGED_FIELDS[flag.rule]:
            small = stats is not None and abs(getattr(stats, name)) <= LARGE_VALUE
            if flag.rule == "large_values" and small:
                continue
            fields.add(name)
    return fields
