"""Histogram of |Δ| on decade (log10) bins, drawn with block characters."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

BAR_WIDTH = 30
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(count: int, largest: int, width: int = BAR_WIDTH) -> str:
    """A bar of `count / largest * width` cells, with eighth-block precision (log-scaled)."""
    if count <= 0 or largest <= 0:
        return ""
    length = math.log1p(count) / math.log1p(largest) * width
    full = int(length)
    return "█" * full + _EIGHTHS[int((length - full) * 8)].strip()


def histogram_text(bins: list[tuple[str, int]], title: str) -> Text:
    """The bins of engine.drill.decade_histogram (or its streamed DecadeCounts) as bars."""
    text = Text(title, style="bold")
    if not bins:
        text.append("\n(empty)", "dim")
        return text
    largest = max(count for _, count in bins)
    for label, count in bins:
        text.append(f"\n{label:>8} ")
        text.append(f"{bar(count, largest):<{BAR_WIDTH}}", "red" if label == "NaN/Inf" else "cyan")
        text.append(f" {count}")
    return text


_LEVELS = "▁▂▃▄▅▆▇█"


def level(count: int, largest: int) -> str:
    """One block character for `count / largest` on the bars' log scale (none for 0)."""
    if count <= 0 or largest <= 0:
        return ""
    share = math.log1p(count) / math.log1p(largest)
    return _LEVELS[min(len(_LEVELS) - 1, int(share * len(_LEVELS)))]


def histogram_lines(bins: list[tuple[str, int]], title: str, width: int) -> Text:
    """The same bins in a few lines for a narrow screen: `title  1e-3 ▂7  1e-2 ▄41 …`, each
    bin a label, a one-character bar and its count, lines broken between bins only (never
    inside one), none longer than `width` unless a single bin is."""
    text = Text(title, style="bold")
    if not bins:
        text.append("  (empty)", "dim")
        return text
    largest = max(count for _, count in bins)
    used = len(title)
    for label, count in _empty_runs_joined(bins):
        bar_char = level(count, largest)
        piece = len(label) + 1 + len(bar_char) + len(str(count))
        if used + 2 + piece > width:
            text.append("\n")
            used = 0
        else:
            text.append("  ")
            used += 2
        text.append(f"{label} ")
        text.append(bar_char, "red" if label == "NaN/Inf" else "cyan")
        text.append(str(count))
        used += piece
    return text


def _empty_runs_joined(bins: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Runs of two or more empty decades as one bin `1e-39…1e-4` of count 0: an attention cell
    whose |Δ| spans 1e-40 to 1e2 has dozens, which would push the decades that matter (the
    largest, NaN/Inf) off a narrow screen."""
    joined: list[tuple[str, int]] = []
    run: list[str] = []
    for label, count in [*bins, ("", 1)]:  # a sentinel closes the last run
        if count == 0 and label.startswith("1e"):
            run.append(label)
            continue
        if run:
            joined.append((run[0] if len(run) == 1 else f"{run[0]}…{run[-1]}", 0))
            run = []
        if label:
            joined.append((label, count))
    return joined


class DeltaHistogram(Static):
    """How the element-wise |A-B| spread over decades (|A| without a reference)."""

    HELP = """
## |Δ| histogram

Counts of |A-B| per decade (`1e-5` = values in [1e-5, 1e-4)), bars on a log scale. Rounding
noise piles up in the low decades; a defect puts mass in the high ones.
"""

    def show(self, bins: list[tuple[str, int]], title: str) -> None:
        self.update(histogram_text(bins, title))
