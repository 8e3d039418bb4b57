"""One number format for every screen and report: a cell of the grid, the per-token strip and
the `bisect` table print the same value the same way.

A cosine always has four decimals (`1.0000`, `0.9999`, `0.0747`) and never loses its leading
digit to look shorter (`.9999`) or its last decimal to fit a sign (`-0.054` beside `0.0747`):
a negative cosine above -1 is written `-.0540`, so that it keeps four decimals in six
characters. Other values (max|Δ|, std, ratios) use fixed point with as many decimals as the
negative form fits in six characters (`3.250` and `-3.250`, `0.0747` and `-.0747`), or `1.2e-5`
when fixed point would lose them.
Textual-free, so the headless commands use it too.
"""

from __future__ import annotations

import math

TEXT_WIDTH = 6
"""The widest number a grid cell (and a bisect table cell) holds."""

COSINE_DECIMALS = 4
"""Enough to tell 0.9990 (apr's Q4K threshold) from 0.9999 (noise)."""


def _signed(magnitude_text: str, negative: bool) -> str:
    """Prefix a minus; below 1 the leading zero gives its column to the sign (`-.0540`)."""
    if not negative:
        return magnitude_text
    if magnitude_text.startswith("0."):
        return "-" + magnitude_text[1:]
    return "-" + magnitude_text


def cosine_text(cosine: float) -> str:
    """A cosine with four decimals, at most six characters except for exactly -1."""
    if math.isnan(cosine):
        return "NaN"
    text = _signed(
        f"{abs(cosine):.{COSINE_DECIMALS}f}", cosine < 0 and f"{cosine:.4f}" != "-0.0000"
    )
    return text if len(text) <= TEXT_WIDTH else f"{cosine:.3f}"


def short_number(value: float) -> str:
    """`value` in at most 6 characters: fixed point when it fits with 2+ significant digits,
    the same decimals for both signs, else `1.2e-5`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-2 <= magnitude < 1e5:
        # Decimals are chosen for the negative form, so that -x and x print alike.
        for decimals in (4, 3, 2, 1, 0):
            negative = _signed(f"{magnitude:.{decimals}f}", True)
            if len(negative) <= TEXT_WIDTH:
                return negative if value < 0 else f"{magnitude:.{decimals}f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    text = f"{mantissa}e{int(exponent)}"
    if len(text) > TEXT_WIDTH:
        mantissa, exponent = f"{value:.0e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text
