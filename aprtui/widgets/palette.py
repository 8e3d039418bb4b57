"""Heat colours: 256 precomputed Rich styles per palette, indexed by a quantized score.

Precomputing the styles keeps a grid repaint to a table lookup per cell. The text colour of
each entry is black or white, whichever reads better on that background.
"""

from __future__ import annotations

from functools import cache

from rich.color import Color
from rich.style import Style

LUT_SIZE = 256

PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    # agreement -> disagreement
    "diverging": ((26, 127, 55), (120, 160, 40), (212, 167, 44), (230, 110, 30), (207, 34, 46)),
    # low -> high
    "sequential": ((31, 58, 147), (42, 120, 160), (42, 157, 143), (160, 190, 90), (233, 196, 106)),
}


def _mix(stops: tuple[tuple[int, int, int], ...], t: float) -> tuple[int, int, int]:
    position = t * (len(stops) - 1)
    low = min(int(position), len(stops) - 2)
    frac = position - low
    return tuple(round(a + (b - a) * frac) for a, b in zip(stops[low], stops[low + 1], strict=True))  # type: ignore[return-value]


def _text_colour(rgb: tuple[int, int, int]) -> str:
    red, green, blue = rgb
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if luminance > 120 else "white"


@cache
def heat_styles(palette: str) -> tuple[Style, ...]:
    """LUT_SIZE styles from score 0 to score 1 along `palette`."""
    stops = PALETTES[palette]
    styles = []
    for index in range(LUT_SIZE):
        rgb = _mix(stops, index / (LUT_SIZE - 1))
        styles.append(Style(color=_text_colour(rgb), bgcolor=Color.from_rgb(*rgb)))
    return tuple(styles)


def score_index(score: float) -> int:
    """A score in [0, 1] as a LUT index."""
    return min(LUT_SIZE - 1, max(0, round(score * (LUT_SIZE - 1))))
