"""What the grid's colours and symbols mean, for the metric on show."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from aprtui.anomalies import ANOMALY_MARKER, MARKER_STYLE, WARNING_STYLE
from aprtui.widgets.metrics import METRIC_BY_KEY, METRICS
from aprtui.widgets.palette import LUT_SIZE, heat_styles, score_index

SCALE_WIDTH = 24


def legend_text(metric_key: str, threshold: float, has_reference: bool) -> Text:
    """Metric name, its colour ramp with tick labels, and the symbol key."""
    metric = METRIC_BY_KEY[metric_key]
    styles = heat_styles(metric.palette)
    available = [m.key for m in METRICS if has_reference or not m.needs_reference]
    position = available.index(metric_key) + 1 if metric_key in available else 0
    text = Text.assemble(
        ("metric ", "bold"),
        (f"[{position}/{len(available)}] ", "dim"),
        (metric.title, "bold"),
        ("  m: next" if len(available) > 1 else "", "dim"),
        "\n",
    )
    for i in range(SCALE_WIDTH):
        text.append(" ", styles[min(LUT_SIZE - 1, i * LUT_SIZE // SCALE_WIDTH)])
    text.append("\n")
    ticks = [" "] * (SCALE_WIDTH + 12)
    for score, label in metric.scale:
        start = min(score_index(score) * SCALE_WIDTH // LUT_SIZE, SCALE_WIDTH - 1)
        start = max(0, min(start, SCALE_WIDTH + 12 - len(label)))
        if score >= 1.0:
            start = max(0, SCALE_WIDTH - len(label))
        if score == 0.5:
            start = max(0, start - len(label) // 2)
        ticks[start : start + len(label)] = list(label)
    text.append("".join(ticks).rstrip() + "\n", "dim")
    if metric.key == "cosine":
        text.append(f"threshold {threshold}\n", "dim")
    text.append_text(
        Text.assemble(
            ("NaN", "bold bright_white on magenta"),
            " non-finite  ",
            (ANOMALY_MARKER, MARKER_STYLE),
            " anomaly flag (a: next)\n",
            ("·", "dim"),
            "   absent   blank: pending or n/a\n",
            ("L3", WARNING_STYLE),
            "  HIGH-VAR layer (output std > 100)",
        )
    )
    if has_reference:
        text.append_text(
            Text.assemble(
                "\n",
                ("▶", "bold red"),
                "   origin / first divergence",
            )
        )
    return text


class Legend(Static):
    """Colour key of the grid's current metric."""

    HELP = """
## Legend

The colour ramp of the metric on show: green = A and B agree, red = they disagree (for std
of A: blue = small, yellow = large). `m` switches the metric. The symbols: magenta `NaN`/`Inf`,
the yellow `!` of apr's anomaly flags (`a` jumps to the next one), `·` absent, `▶` first
divergence.
"""

    def show_metric(self, metric_key: str, threshold: float, has_reference: bool) -> None:
        self.update(legend_text(metric_key, threshold, has_reference))
