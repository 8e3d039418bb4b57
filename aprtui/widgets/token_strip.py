"""Per-token agreement: one cosine per token row, as a coloured strip with the values."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.widgets import Static

from aprtui.widgets.metrics import cosine_score, cosine_text, short_number, std_score
from aprtui.widgets.palette import heat_styles, score_index


def per_token_rows(values: np.ndarray, shape: tuple[int, ...], n_tokens: int) -> np.ndarray | None:
    """`values` as [n_tokens, -1] rows, one per token position; None when the stage has no
    token axis (lm_head's last-token logits).

    Token-major stages are [seq, dim]; attention scores and softmax are [heads, seq, seq],
    whose token axis is the query (axis 1).
    """
    if n_tokens <= 1 and len(shape) < 2:
        return None
    if len(shape) == 3 and shape[1] == n_tokens:
        return np.ascontiguousarray(values.reshape(shape).transpose(1, 0, 2)).reshape(n_tokens, -1)
    if len(shape) >= 2 and shape[0] == n_tokens:
        return values.reshape(n_tokens, -1)
    if n_tokens > 0 and values.size % n_tokens == 0 and len(shape) != 1:
        return values.reshape(n_tokens, -1)
    return None


def per_token_cosine(rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair in float64; 0 where either row has zero norm (apr's rule)."""
    a = rows_a.astype(np.float64)
    b = rows_b.astype(np.float64)
    dot = np.einsum("ij,ij->i", a, b)  # [n_tokens]
    norms = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


STRIP_PER_LINE = 10
"""Token cells per line: 10 × 7 columns fit an 80-column drill-down; the label line and the
value line of one chunk always wrap together."""

STRIP_MAX_CELLS = 100
"""A longer token axis is binned to at most this many cells (10 line pairs), each showing its
bin's worst value and labelled with the bin's first position, so a 4,096-token prompt reads as
a heat strip of 100 cells instead of a wall of fragments."""

STRIP_WORST = 5
"""How many worst positions are listed under a strip longer than one line."""


def _bins(n: int, max_cells: int) -> list[tuple[int, int]]:
    """[start, stop) position ranges: one per position up to max_cells, else equal bins."""
    if n <= max_cells:
        return [(i, i + 1) for i in range(n)]
    width = -(-n // max_cells)
    return [(start, min(start + width, n)) for start in range(0, n, width)]


def _worst(values: np.ndarray, cosine: bool) -> float:
    """A bin's worst value: NaN if any, else the lowest cosine / the largest RMS."""
    if not np.all(np.isfinite(values)):
        return float("nan")
    return float(values.min() if cosine else values.max())


def strip_text(
    values: np.ndarray,
    *,
    cosine: bool,
    threshold: float,
    token_labels: list[str],
    per_line: int = STRIP_PER_LINE,
    max_cells: int = STRIP_MAX_CELLS,
    score_fn=None,
) -> Text:
    """Coloured 7-column cells, `per_line` to a line pair (labels above values): one per token
    position, or per bin of positions (its worst value) past `max_cells`; then, for more than
    one line, the worst positions with their token text. `score_fn(value) -> [0, 1]` replaces
    the RMS colour scale of a non-cosine strip (the logits screen's KL per position)."""
    styles = heat_styles("diverging" if cosine else "sequential")
    values = np.asarray(values, dtype=np.float64)
    bins = _bins(len(values), max_cells)
    binned = len(bins) < len(values)
    lines: list[Text] = []
    for first in range(0, len(bins), per_line):
        labels, cells = Text(), Text()
        for start, stop in bins[first : first + per_line]:
            if binned:
                label = f"{start}+"
            else:
                label = token_labels[start] if start < len(token_labels) else str(start)
            labels.append(f"{label[:6]:>7}", "dim")
            value = _worst(values[start:stop], cosine)
            if not np.isfinite(value):
                cells.append(" ")
                cells.append(f"{'NaN':>6}", "bold bright_white on magenta")
                continue
            if cosine:
                score = cosine_score(value, threshold)
            else:
                score = score_fn(value) if score_fn is not None else std_score(value)
            text = cosine_text(value) if cosine else short_number(value)
            cells.append(" ")
            cells.append(f"{text:>6}", styles[score_index(score)])
        lines += [labels, cells]
    if len(bins) > per_line:
        lines.append(_worst_line(values, cosine, token_labels, binned))
    return Text("\n").join(lines)


def _worst_line(values: np.ndarray, cosine: bool, token_labels: list[str], binned: bool) -> Text:
    """`worst: 17 'tok' 0.93, ...`: the STRIP_WORST worst positions, NaN first."""
    key = np.where(np.isfinite(values), values if cosine else -values, -np.inf)
    order = np.argsort(key, kind="stable")[:STRIP_WORST]
    parts = []
    for position in order.tolist():
        value = float(values[position])
        token = token_labels[position] if position < len(token_labels) else ""
        shown = (
            "NaN"
            if not np.isfinite(value)
            else (cosine_text(value) if cosine else short_number(value))
        )
        parts.append(f"{position} {token!r} {shown}" if token else f"{position} {shown}")
    note = f" (of {len(values)} positions, binned)" if binned else ""
    return Text(f"worst{note}: " + ", ".join(parts), "dim")


class TokenStrip(Static):
    """Cosine(A, B) per token position (RMS of A per token without a reference)."""

    HELP = """
## Per-token strip

One cell per token position: the cosine between A's and B's rows for that token (the query
position for attention scores), coloured like the grid. Without a reference it shows the RMS of
A per token. A defect that hits one position (a RoPE offset, a mask) shows up here.
"""

    def show(
        self,
        values: np.ndarray | None,
        *,
        cosine: bool,
        threshold: float,
        token_labels: list[str],
    ) -> None:
        title = "per-token cosine(A, B)" if cosine else "per-token RMS of A"
        if values is None:
            self.update(Text.assemble((title, "bold"), "\n", ("no token axis", "dim")))
            return
        body = strip_text(values, cosine=cosine, threshold=threshold, token_labels=token_labels)
        self.update(Text.assemble((title, "bold"), "\n", body))
