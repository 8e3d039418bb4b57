"""Histogram of |Δ| on decade (log10) bins, drawn with block characters."""

from __future__ import annotations

import math

import numpy as np
from rich.text import Text
from textual.widgets import Static

BAR_WIDTH = 30
_EIGHTHS = " ▏▎▍▌▋▊▉"


def decade_histogram(magnitudes: np.ndarray) -> list[tuple[str, int]]:
    """(bin label, count) per decade of the finite magnitudes, plus exact zeros and non-finite.

    Bins run from the smallest to the largest non-zero decade present: `[1e-4, 1e-3)` etc.
    """
    values = np.abs(np.asarray(magnitudes, dtype=np.float64).ravel())
    finite = np.isfinite(values)
    zeros = int(np.count_nonzero(values == 0))
    positive = values[finite & (values > 0)]
    bins: list[tuple[str, int]] = []
    if zeros:
        bins.append(("0", zeros))
    if positive.size:
        decades = np.floor(np.log10(positive)).astype(np.int64)
        low, high = int(decades.min()), int(decades.max())
        counts = np.bincount(decades - low, minlength=high - low + 1)
        bins += [(f"1e{low + i}", int(count)) for i, count in enumerate(counts)]
    nonfinite = int(np.count_nonzero(~finite))
    if nonfinite:
        bins.append(("NaN/Inf", nonfinite))
    return bins


def bar(count: int, largest: int, width: int = BAR_WIDTH) -> str:
    """A bar of `count / largest * width` cells, with eighth-block precision (log-scaled)."""
    if count <= 0 or largest <= 0:
        return ""
    length = math.log1p(count) / math.log1p(largest) * width
    full = int(length)
    return "█" * full + _EIGHTHS[int((length - full) * 8)].strip()


def histogram_text(magnitudes: np.ndarray, title: str) -> Text:
    bins = decade_histogram(magnitudes)
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


class DeltaHistogram(Static):
    """How the element-wise |A-B| spread over decades (|A| without a reference)."""

    HELP = """
## |Δ| histogram

Counts of |A-B| per decade (`1e-5` = values in [1e-5, 1e-4)), bars on a log scale. Rounding
noise piles up in the low decades; a defect puts mass in the high ones.
"""

    def show(self, magnitudes: np.ndarray, title: str) -> None:
        self.update(histogram_text(magnitudes, title))
